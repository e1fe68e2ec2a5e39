"""tb bench restore's table: every prefetch from a tier sits beside that tier's own read of the
same runs on as many threads, taken from install_bench's JSON as it writes it."""
import json
import os
import subprocess

import pytest

from snaptier_testbed.bench import restore_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL_BENCH = os.path.join(ROOT, "build", "host", "tier-agent", "install_bench")


def _run(kind, source, threads, batch, gbs, ratio=None):
    return {"kind": kind, "source": source, "pattern": "contiguous", "threads": threads, "batch_pages": batch,
            "whole_runs": batch == 4096, "gb_per_s": gbs, "ratio_tier_read": ratio}


def test_each_prefetch_is_paired_with_the_tier_read_of_its_own_threads_and_batch():
    runs = [{"label": "rdma", "tier": {"in_place": False}, "demand_faults": {"p50_us": 1500.0, "p99_us": 4000.0},
             "memcpy_fresh_1_thread_gb_per_s": 0.4,
             "results": [_run("prefetch", "tier", 1, 64, 0.010, 0.8), _run("prefetch", "tier", 2, 64, 0.012, 0.9),
                         _run("tier-read", "tier", 1, 64, 0.0125), _run("tier-read", "tier", 2, 64, 0.0133),
                         _run("tier-read", "tier", 1, 4096, 0.5), _run("zero", "zero", 1, 4096, 3.0)]}]
    rows = restore_rows("t", runs)
    assert [(r["threads"], r["batch_pages"]) for r in rows] == [(1, 64), (2, 64)]
    assert rows[0]["tier_read_mb_s"] == 12.5 and rows[1]["tier_read_mb_s"] == 13.3
    assert rows[0]["prefetch_mb_s"] == 10.0 and rows[0]["ratio_tier_read"] == 0.8
    assert all(r["demand_fault_p50_us"] == 1500.0 for r in rows)
    assert rows[0]["fresh_memcpy_mb_s"] == 400.0 and rows[0]["ratio_fresh_memcpy"] == 0.025


@pytest.mark.skipif(not os.access(INSTALL_BENCH, os.X_OK), reason="install_bench is not built (make build)")
def test_the_table_reads_what_install_bench_writes(tmp_path):
    out = tmp_path / "ib"
    r = subprocess.run([INSTALL_BENCH, "--tier", "local", "--size", "4", "--rounds", "1", "--threads", "1", "2",
                        "--batch", "64", "0", "--fault-pages", "64", "--json", f"{out}.json", "--csv", f"{out}.csv"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "ib.json").read_text())
    doc["label"] = "local DRAM"
    rows = restore_rows("host", [doc])
    assert len(rows) == 4  # two batch sizes x two thread counts
    for row in rows:
        assert row["prefetch_mb_s"] > 0 and row["tier_read_mb_s"] > 0
        assert row["ratio_tier_read"] == pytest.approx(row["prefetch_mb_s"] / row["tier_read_mb_s"], rel=0.5)
    assert {row["in_place"] for row in rows} == {True}  # a local tier maps its bytes
