"""Tier benchmark in a running topology: tier_bench (the agent's own tiers, built for trixie)
per tier inside the guests: local DRAM, file, CXL (whatever emulation the topology uses) and the
RDMA pool of a memory node: random reads by one thread and by several at once, and sequential
1 MiB reads. The RDMA tier is measured beside perftest's ib_read_bw on the same pair of guests,
run just before it (the link's limit with many READs in flight). Results:
run/<topology>/bench-tiers.json and .csv, and a table.

The CXL run formats the shared region as scratch, so agents are stopped first and the region's
head is wiped afterwards; agents are started again on a fresh directory (published snapshots
are gone after a bench, by design)."""
from __future__ import annotations

import csv
import json
import re
import time

from . import agents, health, launcher
from .launcher import TestbedError, say
from .state import state_dir_for
from .topology import Topology

BENCH = f"{agents.GUEST_BUILD}/tier_bench"
# The host's CXL device as its set-up unit recorded it (/dev/daxX.Y in a guest, the shared file
# in a native host), expanded by the host's shell.
CXL_DEVICE = """$(python3 -c 'import json; print(json.load(open("/run/snaptier/cxl.json"))["device"])')"""


def _json_run(topo, host, script, what, label, timeout):
    """A benchmark in `host` that prints its JSON document on stdout, labelled."""
    r = launcher.run_in(topo, host, script, timeout=timeout)
    if r.returncode != 0:
        raise TestbedError(f"{what} {label} on {host} failed: {r.stderr.strip()[-400:]}")
    doc = json.loads(r.stdout)
    doc["label"] = label
    doc["host"] = host
    return doc


def _bench(topo, host, args, label, timeout=900):
    return _json_run(topo, host, f"cd /tmp && timeout {timeout - 30} {BENCH} --json {args}", "tier_bench", label,
                     timeout)


def _ib_read_bw(topo, host, memnode, mem_ip):
    """ib_read_bw's 64 KiB READ bandwidth host -> memnode in MiB/s, or None if perftest failed."""
    r = health._perftest(topo, memnode, mem_ip, host, "ib_read_bw", "-s 65536 -D 3", 18690)
    m = re.search(r"^\s*65536\s+\d+\s+([\d.]+)\s+([\d.]+)", r.stdout, re.M)
    return float(m.group(2)) if r.returncode == 0 and m else None


def _bench_host(topo: Topology):
    """The compute host a bench runs in (the first of the CXL device's hosts), its device and the
    memory node on its link (either may be None)."""
    dev = next((c for c in topo.cxl), None)
    host = dev.hosts[0] if dev else next(h.name for h in topo.hosts if h.role == "compute")
    link = topo.link_of(host)
    memnode = next((m for m in topo.hosts if m.role == "memory" and link and m.name in link.hosts), None)
    mem_ip = str(link.address_of(memnode.name).ip) if memnode else None
    return host, dev, memnode, mem_ip


def _each_tier(topo: Topology, run, file_path: str, rdma_variants=(("", ""),)) -> list[dict]:
    """`run(tier_args, label)` once per tier of the bench host: local, file, the memory node's
    RDMA pool (once per (extra args, label suffix) of `rdma_variants`) and the CXL device, which
    is formatted as scratch: the agents are stopped for it, its head wiped afterwards and the
    agents started again on a fresh directory."""
    state_dir = state_dir_for(topo.name)
    host, dev, memnode, mem_ip = _bench_host(topo)
    disk = "ext4 on virtio-blk" if topo.guests else "this machine's disk"
    out = [run("--tier local", "local DRAM"), run(f"--tier file --path {file_path}", f"file ({disk})")]
    if memnode:
        agents.start(topo)
        token = (state_dir / "agent-token").read_text().strip()
        base = f"--tier rdma --memnode {mem_ip}:{agents.CONTROL_PORT} --token {token} --device rxe0 --gid-index 1"
        for extra, suffix in rdma_variants:
            out.append(run(base + extra, f"rdma (rxe, pool on {memnode.name}{suffix})"))
    if dev:
        agents.stop(topo)
        try:
            out.append(run(f"--tier cxl --path {CXL_DEVICE} --format --host-index 0", f"cxl ({dev.emulation})"))
        finally:
            launcher.run_in(topo, host, "python3 /opt/snaptier/testbed/guest/daxprobe.py wipe-head", timeout=120)
            agents.start(topo)
    return out


def run_bench(topo: Topology, size_mib: int = 16, iterations: int = 2000, threads: int = 4) -> int:
    launcher.load_running(topo)
    state_dir = state_dir_for(topo.name)
    host, _, memnode, mem_ip = _bench_host(topo)
    common = f"--size {size_mib << 20} --iterations {iterations} --threads {threads}"
    t0 = time.monotonic()
    say(f"tier_bench on {host}: {size_mib} MiB working set, {iterations} random reads per block size "
        f"(1 and {threads} threads), sequential 1 MiB reads")
    # The link's limit, just before the tier reads it.
    limit = _ib_read_bw(topo, host, memnode.name, mem_ip) if memnode else None
    # One work request at a time (as before the tier had depth) beside the default, same run.
    results = _each_tier(topo, lambda args, label: _bench(topo, host, f"{common} {args}", label),
                         "/var/tmp/tier-bench", rdma_variants=[(f" --rdma-depth {d}", f", {d} in flight") for d in (1, 16)])
    for run in results:
        if run["tier"] == "rdma":
            run["ib_read_bw_mib_s"] = limit
    out = {"topology": topo.name, "seconds": round(time.monotonic() - t0, 1),
           "units": {"latency": "us", "throughput": "MiB/s"}, "runs": results}
    (state_dir / "bench-tiers.json").write_text(json.dumps(out, indent=1) + "\n")
    with open(state_dir / "bench-tiers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["topology", "tier", "host", "pattern", "threads", "block_bytes", "p50_us", "p99_us", "mean_us",
                    "throughput_mib_s", "ib_read_bw_mib_s"])
        for run in results:
            for r in run["results"]:
                w.writerow([topo.name, run["label"], run["host"], r["pattern"], r["threads"], r["block_bytes"],
                            round(r["p50_ns"] / 1e3, 2), round(r["p99_ns"] / 1e3, 2), round(r["mean_ns"] / 1e3, 2),
                            round(r["throughput_mib_s"], 1), run.get("ib_read_bw_mib_s") or ""])
    local = {(r["pattern"], r["threads"], r["block_bytes"]): r for r in results[0]["results"]}
    print(f"\ntier benchmark on topology {topo.name}, host {host}"
          + (" (emulated: compare ratios, not absolutes)" if topo.guests else " (native: this machine's CPU and DRAM)"))
    print(f"  {'tier':32} {'pattern':>10} {'thr':>3} {'block':>6} {'p50 us':>9} {'p99 us':>9} {'MiB/s':>8} "
          f"{'p50 vs local':>13}")
    for run in results:
        for r in run["results"]:
            base = local.get((r["pattern"], r["threads"], r["block_bytes"]))
            ratio = r["p50_ns"] / base["p50_ns"] if base else 0
            print(f"  {run['label']:32} {r['pattern']:>10} {r['threads']:>3} {r['block_bytes'] // 1024:>5}K "
                  f"{r['p50_ns'] / 1e3:>9.1f} {r['p99_ns'] / 1e3:>9.1f} {r['throughput_mib_s']:>8.1f} {ratio:>12.0f}x")
        seq = next((r for r in run["results"] if r["pattern"] == "sequential"), None)
        if run.get("ib_read_bw_mib_s") and seq:
            print(f"  {'':32} sequential {seq['block_bytes'] // 1024} KiB reads {seq['throughput_mib_s']:.1f} MiB/s = "
                  f"{seq['throughput_mib_s'] / run['ib_read_bw_mib_s']:.0%} of ib_read_bw's "
                  f"{run['ib_read_bw_mib_s']:.1f} MiB/s (64 KiB READs, many in flight)")
    print(f"results: {state_dir / 'bench-tiers.json'} and .csv")
    return 0


INSTALL_BENCH = f"{agents.GUEST_BUILD}/install_bench"


def _install_bench(topo, host, args, label, timeout=1200):
    out = f"/tmp/install-bench-{int(time.time() * 1000)}"
    say(f"install_bench {label} on {host}")
    return _json_run(topo, host, f"cd /tmp && timeout {timeout - 30} {INSTALL_BENCH} {args} "
                                 f"--json {out}.json --csv {out}.csv > {out}.log 2>&1; rc=$?; "
                                 f"cat {out}.json 2>/dev/null; tail -5 {out}.log >&2; rm -f {out}.*; exit $rc",
                     "install_bench", label, timeout)


def restore_rows(topology: str, runs: list[dict]) -> list[dict]:
    """One row per prefetch from a tier, beside that tier's own reads of the same runs on as many
    threads in the same run (install_bench's tier-read: the source's limit) and a memcpy into fresh
    anonymous memory (first-touch faults included: the destination's limit, which every page
    installation pays too)."""
    rows = []
    for run in runs:
        for r in run["results"]:
            if r["kind"] != "prefetch" or r["source"] != "tier":
                continue
            limit = next((x for x in run["results"] if x["kind"] == "tier-read" and x["threads"] == r["threads"]
                          and x["batch_pages"] == r["batch_pages"]), None)
            rows.append({"topology": topology, "tier": run["label"], "in_place": run["tier"]["in_place"],
                         "batch_pages": r["batch_pages"], "whole_runs": r["whole_runs"], "threads": r["threads"],
                         "prefetch_mb_s": round(r["gb_per_s"] * 1e3, 1),
                         "tier_read_mb_s": round(limit["gb_per_s"] * 1e3, 1) if limit else "",
                         "ratio_tier_read": round(r["ratio_tier_read"], 3) if r.get("ratio_tier_read") else "",
                         "fresh_memcpy_mb_s": round(run["memcpy_fresh_1_thread_gb_per_s"] * 1e3, 1),
                         "ratio_fresh_memcpy": round(r["gb_per_s"] / run["memcpy_fresh_1_thread_gb_per_s"], 3),
                         "demand_fault_p50_us": round(run["demand_faults"]["p50_us"], 1),
                         "demand_fault_p99_us": round(run["demand_faults"]["p99_us"], 1)})
    return rows


def run_restore_bench(topo: Topology, size_mib: int = 16, rounds: int = 3) -> int:
    """The fault engine's page installation inside a compute host, from each of its tiers, beside
    that tier's own read bandwidth in the same run (install_bench --tier)."""
    launcher.load_running(topo)
    state_dir = state_dir_for(topo.name)
    host = _bench_host(topo)[0]
    common = f"--size {size_mib} --rounds {rounds} --threads 1 2 --batch 64 0 --fault-pages 256"
    t0 = time.monotonic()
    runs = _each_tier(topo, lambda args, label: _install_bench(topo, host, f"{common} {args}", label), "/var/tmp")
    out = {"topology": topo.name, "host": host, "seconds": round(time.monotonic() - t0, 1),
           "units": {"throughput": "MB/s (1e6 bytes)", "latency": "us"}, "runs": runs}
    (state_dir / "bench-restore.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = restore_rows(topo.name, runs)
    with open(state_dir / "bench-restore.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["topology"])
        w.writeheader()
        w.writerows(rows)
    print(f"\npage installation on topology {topo.name}, host {host}, {size_mib} MiB working set, {rounds} rounds "
          f"(medians{'; emulated: compare ratios' if topo.guests else ''})")
    print(f"  {'tier':30} {'batch':>8} {'thr':>3} {'prefetch MB/s':>14} {'tier read MB/s':>15} {'ratio':>6} "
          f"{'fresh memcpy':>13} {'ratio':>6} {'fault p50 us':>13}")
    for r in rows:
        batch = "runs" if r["whole_runs"] else str(r["batch_pages"])
        ratio = f"{r['ratio_tier_read']:.2f}" if r["ratio_tier_read"] != "" else "-"
        print(f"  {r['tier']:30} {batch:>8} {r['threads']:>3} {r['prefetch_mb_s']:>14.1f} {r['tier_read_mb_s']:>15} "
              f"{ratio:>6} {r['fresh_memcpy_mb_s']:>13.1f} {r['ratio_fresh_memcpy']:>6.2f} "
              f"{r['demand_fault_p50_us']:>13.1f}")
    print(f"results: {state_dir / 'bench-restore.json'} and .csv")
    return 0
