#!/usr/bin/python3
"""Plots tier_bench results (the CSVs `testbed/tb bench` writes) as p50 latency per tier.
   testbed/plot-bench.py OUT.png run/default/bench-tiers.csv [run/nvdimm/bench-tiers.csv ...]"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    rows = {}
    for path in sys.argv[2:]:
        for r in csv.DictReader(open(path)):
            if r.get("pattern", "random") != "random" or r.get("threads", "1") != "1":
                continue  # the latency plot is one reader's random reads
            rows[(r["tier"], int(r["block_bytes"]))] = float(r["p50_us"])
    tiers = list(dict.fromkeys(t for t, _ in rows))
    blocks = sorted({b for _, b in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(blocks)
    for i, block in enumerate(blocks):
        xs = [j + i * width for j in range(len(tiers))]
        ax.bar(xs, [rows.get((t, block), 0) for t in tiers], width, label=f"{block // 1024} KiB read")
    ax.set_xticks([j + width * (len(blocks) - 1) / 2 for j in range(len(tiers))])
    ax.set_xticklabels(tiers, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency [us] (log)")
    ax.set_title("snaptier tiers in the emulated testbed (QEMU TCG): compare ratios")
    ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[1], dpi=110)
    print(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
