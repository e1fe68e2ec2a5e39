#!/usr/bin/python3
"""Plots install_bench results: prefetch GB/s per installer thread count, one bar group per
thread count, against memcpy of the same bytes in the same run.
   testbed/plot-install-bench.py OUT.png docs/data/install-bench.json [SOURCE]"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    data = json.load(open(sys.argv[2]))
    source = sys.argv[3] if len(sys.argv) > 3 else "dram"
    rows = [r for r in data["results"] if r["kind"] == "prefetch" and r["source"] == source]
    threads = sorted({r["threads"] for r in rows})
    series = []
    for r in rows:
        label = "1-page runs (scattered)" if r["pattern"] == "scattered" else (
            "long run, whole run per copy" if r["whole_runs"] else f"long run, {r['batch_pages']} pages per copy")
        if label not in series:
            series.append(label)
    value = {}
    for r in rows:
        label = "1-page runs (scattered)" if r["pattern"] == "scattered" else (
            "long run, whole run per copy" if r["whole_runs"] else f"long run, {r['batch_pages']} pages per copy")
        value[(label, r["threads"])] = (r["gb_per_s"], r["gb_per_s_min"], r["gb_per_s_max"])
    def order(label):
        if label.startswith("1-page"):
            return (2, 0)
        if "whole" in label:
            return (1, 0)
        return (0, int(label.split(", ")[1].split()[0]))

    series.sort(key=order)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    for i, label in enumerate(series):
        xs = [j + i * width for j in range(len(threads))]
        med = [value.get((label, t), (0, 0, 0))[0] for t in threads]
        lo = [m - value.get((label, t), (0, 0, 0))[1] for m, t in zip(med, threads)]
        hi = [value.get((label, t), (0, 0, 0))[2] - m for m, t in zip(med, threads)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=label)
    for m in data["memcpy"]:
        if m["threads"] in (1, max(threads)):
            ax.axhline(m["gb_per_s"], ls="--" if m["threads"] == 1 else ":", color="k", lw=1)
            ax.text(len(threads) - 0.4, m["gb_per_s"], f"memcpy {m['threads']} thr", fontsize=7, va="bottom")
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(threads))])
    ax.set_xticklabels([f"{t} installer thread{'s' if t > 1 else ''}" for t in threads])
    ax.set_ylabel("GB/s (median, bars: min..max)")
    mib = data["config"]["size_bytes"] >> 20
    ax.set_title(f"fault engine prefetch of {mib} MiB, source {source}, native host (2 shared cores)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(sys.argv[1], dpi=110)
    print(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
