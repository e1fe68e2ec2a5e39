"""tb burst without guests: argument checks that stop before any guest is contacted, the summary
math over instances and hosts, ratios, the CSV/JSON shape, and whole runs against a fake agent
answering synthetic BurstResult objects (docs/schema/control.schema.json), leftovers included."""
import csv
import json
import os
import subprocess
import threading

import pytest

from conftest import REPO
from snaptier_testbed import burst, cli, launcher, matrix
from snaptier_testbed.topology import load_topology, parse_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]
DEFAULT = load_topology(REPO / "testbed/topologies/default.toml")
NATIVE = load_topology(REPO / "testbed/topologies/native.toml")
MiB = 2**20


# ---------------------------------------------------------------- synthetic agent objects
def instance(index, host="host1", policy="tiered", answered=100.0, anon=4 * MiB, ok=True, answer_ok=True,
             digest_ok=True, busy=False, moved=None, faults=50):
    if busy:
        return {"index": index, "busy": True, "ok": False, "started_at_ms": None, "answered_at_ms": None,
                "error": "busy: at max_operations", "host": host, "policy": policy}
    return {"index": index, "busy": False, "started_at_ms": 1.0 * index, "answered_at_ms": answered,
            "snapshot": "matmul-burst-x", "variant": "matmul-burst-x", "function": "matmul", "policy": policy,
            "mechanism": "snaptier-lazy", "host": host, "ok": ok, "error": None if ok else "criu restore failed",
            "missing": None, "answer_ok": answer_ok, "problems": [], "digest_ok": digest_ok, "digest": "ab" * 32,
            "zero_pages": 3, "snapshot_pages": 100, "snapshot_bytes_per_tier": {"cxl": 409600}, "cold_tier": "rdma",
            "restore_ms": answered - 20.0, "first_response_ms": answered - 1.0 * index, "local_anonymous_bytes": anon,
            "local_memory_bytes": anon + MiB, "cxl_mapped_bytes": MiB, "faults": {"total": faults},
            "bytes_moved_per_tier": moved if moved is not None else {"cxl": 8192, "rdma": 4096}}


def burst_result(instances, host="host1", policy="tiered"):
    answered = [i["answered_at_ms"] for i in instances if i.get("answered_at_ms") is not None]
    return {"snapshot": "matmul-burst-x", "policy": policy, "host": host, "instances": instances,
            "burst": {"instances": len(instances), "ok": sum(i.get("ok") is True for i in instances),
                      "failed": sum(i.get("ok") is not True and not i["busy"] for i in instances),
                      "busy": sum(i["busy"] for i in instances),
                      "first_answer_ms": min(answered) if answered else None,
                      "last_answer_ms": max(answered) if answered else None, "instances_per_s": 1.0,
                      "wall_ms": 900.0, "local_anonymous_bytes_sum": sum(i.get("local_anonymous_bytes", 0)
                                                                         for i in instances),
                      "local_memory_bytes_sum": 0, "cxl_mapped_bytes_sum": 0, "bytes_moved_per_tier": {},
                      "faults_total": sum((i.get("faults") or {}).get("total", 0) for i in instances),
                      "host_memory_used_bytes": 10 * MiB, "agent_rss_bytes_before": 20 * MiB,
                      "agent_rss_bytes_peak": 23 * MiB, "serving": "one-thread",
                      "agent_threads_before": 9, "agent_threads_at_hold": 10 + len(instances)}}


def single_result(host="host1", policy="tiered", **kw):
    doc = instance(0, host, policy, **kw)
    for key in ("index", "busy", "started_at_ms", "answered_at_ms"):
        doc.pop(key)
    return doc


def part(host, result, leftovers=None, sent=0.0, **kw):
    return {"host": host, "tierctl_rc": 0, "error": None, "result": result, "skipped": None, "sent_at_ms": sent,
            "replied_at_ms": 1000.0, "leftovers": leftovers or {"operations": 0, "instances": [], "error": None},
            **kw}


def cell(policy, n, parts):
    return {"policy": policy, "instances": n, "snapshot_id": "matmul-burst-x", "snapshot_host": "host0",
            "hosts": parts}


def results(cells, policies=("criu-eager", "tiered"), hosts=("host0", "host1"), allow_busy=False):
    return {"kind": "burst", "topology": "default", "backend": "qemu", "function": "matmul",
            "policies": list(policies), "instance_counts": sorted({c["instances"] for c in cells}),
            "hosts": list(hosts), "snapshot_host": hosts[0], "allow_busy": allow_busy, "cells": cells}


def two_hosts(policy, n, answered=(100.0, 200.0), anon=4 * MiB, sent=(0.0, 3.0)):
    """n instances on each host: host0's answer at answered[0] + i, host1's at answered[1] + i."""
    return cell(policy, n, [part(h, burst_result([instance(i, h, policy, answered=a + i, anon=anon)
                                                   for i in range(n)], h, policy), sent=s)
                            for h, a, s in zip(("host0", "host1"), answered, sent)])


def rows_by(rows):
    return {(r["policy"], r["instances"], r["host"]): r for r in rows}


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("text,counts", [("1,2,4", [1, 2, 4]), ("16, 1,4,4", [1, 4, 16]), ("256", [256])])
def test_instance_counts_are_sorted_and_deduplicated(text, counts):
    assert burst.parse_instance_counts(text) == counts


def _refuse(*a, **k):
    raise AssertionError("a guest was contacted")


@pytest.mark.parametrize("args,message", [
    (["--policies", "reap,eager"], "--policies: unknown policy 'eager'; known: criu-eager,"),
    (["--policy", "nope"], "--policies: unknown policy 'nope'"),
    (["--function", "nope"], "--function: unknown function 'nope'; known: helloworld,"),
    (["--function", "matmul,pyaes"], "one function per burst"),
    (["--instances", "0"], "--instances: 0 is outside 1..256"),
    (["--instances", "1,257"], "--instances: 257 is outside 1..256"),
    (["--instances", "-3"], "--instances: -3 is outside"),
    (["--instances", "two"], "--instances: 'two' is not a whole number"),
    (["--instances", ","], "--instances: empty list"),
    (["--hosts", "host0,host7"], "--hosts: 'host7' is not a host of topology 'default'"),
    (["--hosts", "mem0"], "--hosts: 'mem0' is a memory node"),
    (["--hosts", ","], "--hosts: empty list"),
])
def test_bad_arguments_exit_2_before_any_guest(args, message, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "run_in", _refuse)
    monkeypatch.setattr(launcher, "load_running", _refuse)
    monkeypatch.setattr(burst, "run_burst", _refuse)
    assert cli.main(["burst", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed: error: ") and message in err


def test_tb_burst_usage_error_through_the_entry_point(tmp_path):
    env = {**os.environ, "SNAPTIER_STATE": str(tmp_path)}
    r = subprocess.run([*TB, "burst", "--function", "matmul", "--policies", "reap,bogus"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unknown policy 'bogus'" in r.stderr and "not up" not in r.stderr
    r = subprocess.run([*TB, "burst", "--instances", "1,4"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "is not up" in r.stderr
    assert not any(tmp_path.iterdir())  # no results directory for a run that never started


def test_default_hosts_are_those_that_share_the_copy():
    assert burst.pick_burst_hosts(DEFAULT, None) == ["host0", "host1"]
    # No RDMA pool: the tiered copy is private to the snapshot host, so one host unless told.
    assert burst.pick_burst_hosts(NATIVE, None) == ["host0"]
    assert burst.pick_burst_hosts(NATIVE, "host1,host0,host1") == ["host1", "host0"]
    apart = parse_topology({"name": "t", "backend": "native",
                            "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"}]})
    with pytest.raises(matrix.UsageError, match="b shares no CXL device and no RDMA pool with a"):
        burst.pick_burst_hosts(apart, "a,b")
    assert burst.pick_burst_hosts(apart, "b") == ["b"]


def test_the_restore_timeout_grows_with_the_instance_count():
    timeouts = [burst.restore_timeout_s(n) for n in (1, 2, 16, 256)]
    assert timeouts[0] == matrix.RESTORE_TIMEOUT_S and timeouts == sorted(set(timeouts))
    # A burst of one too: its times then count from the burst's start like the others'.
    assert burst.restore_command("m", "reap", 1) == "restore m --policy reap --instances 1"
    assert burst.restore_command("m", "reap", 8).endswith("--instances 8")


# ---------------------------------------------------------------- summary math
def test_a_single_restore_is_a_burst_of_one():
    doc = single_result(answered=80.0)
    b = burst.as_burst(doc)
    assert len(b["instances"]) == 1 and b["instances"][0]["answered_at_ms"] == doc["first_response_ms"]
    rows = rows_by(burst.rows_of(results([cell("tiered", 1, [part("host1", doc)])], hosts=("host1",)))[0])
    one = rows[("tiered", 1, "host1")]
    assert one["ok"] and one["ok_instances"] == 1 and one["first_answer_ms"] == one["last_answer_ms"] == 80.0
    assert burst.as_burst({"error": {"code": "not_found", "message": "x"}}) is None


def test_sums_over_instances_and_hosts_and_first_and_last_answer():
    rows = rows_by(burst.rows_of(results([two_hosts("tiered", 4)]))[0])
    h0, h1, every = rows[("tiered", 4, "host0")], rows[("tiered", 4, "host1")], rows[("tiered", 4, "all")]
    assert (h0["first_answer_ms"], h0["last_answer_ms"]) == (100.0, 103.0)
    assert (h1["first_answer_ms"], h1["last_answer_ms"]) == (200.0, 203.0)
    assert h0["local_anonymous_bytes"] == 4 * 4 * MiB and h0["bytes_cxl"] == 4 * 8192
    assert h0["instances_per_s"] == round(4 / 0.103, 2)
    assert every["hosts"] == 2 and every["requested"] == 8 and every["ok_instances"] == 8
    assert (every["first_answer_ms"], every["last_answer_ms"]) == (100.0, 203.0)
    assert every["local_anonymous_bytes"] == h0["local_anonymous_bytes"] + h1["local_anonymous_bytes"]
    assert every["local_anonymous_per_instance_MiB"] == 4.0
    assert every["bytes_rdma"] == 8 * 4096 and every["faults_total"] == 8 * 50
    assert every["instances_per_s"] == round(8 / 0.203, 2)
    assert every["host_memory_used_bytes"] == 20 * MiB and every["agent_rss_growth_bytes"] == 6 * MiB
    assert h0["agent_threads_added"] == 1 + 4 and every["agent_threads_added"] == 2 * (1 + 4)
    assert h0["serving"] == "one-thread"
    assert every["launch_skew_ms"] == 3.0 and every["ok"] and every["error"] is None
    assert every["notes"] is None  # the synthetic agent summaries agree with their instances
    # One copy serves every instance on every host: what it stores does not grow with them.
    assert h0["stored_cxl_bytes"] == h1["stored_cxl_bytes"] == every["stored_cxl_bytes"] == 409600


def test_an_agent_summary_that_disagrees_with_its_instances_is_noted_not_failed():
    doc = burst_result([instance(i, "host1") for i in range(2)])
    doc["burst"]["ok"] = 1
    row = burst.host_row(cell("tiered", 2, []), part("host1", doc), "matmul", False)[0]
    assert row["ok"] and row["ok_instances"] == 2 and "burst.ok is 1, its instances sum to 2" in row["notes"]


def test_busy_instances_fail_the_cell_unless_allowed():
    insts = [instance(0, "host1"), instance(1, "host1", busy=True), instance(2, "host1", busy=True)]
    c = cell("tiered", 3, [part("host1", burst_result(insts))])
    strict = rows_by(burst.rows_of(results([c], hosts=("host1",)))[0])[("tiered", 3, "host1")]
    assert not strict["ok"] and strict["busy"] == 2 and strict["failed"] == 0 and strict["ok_instances"] == 1
    assert "busy" in strict["error"]
    lenient = rows_by(burst.rows_of(results([c], hosts=("host1",), allow_busy=True))[0])
    assert lenient[("tiered", 3, "host1")]["ok"] and lenient[("tiered", 3, "all")]["ok"]
    # Sums are over the instances that started; per instance divides by them too.
    assert lenient[("tiered", 3, "all")]["local_anonymous_per_instance_MiB"] == 4.0
    # A whole request refused as busy is N busy instances; nothing ran, so even allowed it fails.
    refused = cell("tiered", 4, [part("host1", {"error": {"code": "busy", "message": "at max_operations"}})])
    row = rows_by(burst.rows_of(results([refused], hosts=("host1",), allow_busy=True))[0])[("tiered", 4, "host1")]
    assert row["busy"] == 4 and not row["ok"]


@pytest.mark.parametrize("bad,message", [
    ({"ok": False, "answer_ok": None, "digest_ok": None}, "criu restore failed"),
    ({"answer_ok": False}, "wrong answer"),
    ({"digest_ok": False}, "state digest differs"),
])
def test_one_failed_instance_fails_the_cell_and_is_named(bad, message):
    insts = [instance(0, "host1"), instance(1, "host1", **bad)]
    rows = rows_by(burst.rows_of(results([cell("tiered", 2, [part("host1", burst_result(insts))])],
                                         hosts=("host1",)))[0])
    row = rows[("tiered", 2, "host1")]
    assert not row["ok"] and row["failed"] == 1 and row["ok_instances"] == 1
    assert "instance 1: " in row["error"] and message in row["error"]
    assert not rows[("tiered", 2, "all")]["ok"] and burst.exit_status(list(rows.values())) == 1


def test_missing_instances_wrong_host_and_transport_errors_fail():
    short = burst_result([instance(0, "host1")])
    row = burst.host_row(cell("tiered", 3, []), part("host1", short), "matmul", False)[0]
    assert not row["ok"] and row["missing"] == 2 and "2 of 3 instances missing" in row["error"]
    elsewhere = burst_result([instance(0, "host0"), instance(1, "host0")], host="host0")
    row = burst.host_row(cell("tiered", 2, []), part("host1", elsewhere), "matmul", False)[0]
    assert not row["ok"] and "not on host1" in row["error"]
    lost = part("host1", None, error="no answer within 720 s", tierctl_rc=124)
    row = burst.host_row(cell("tiered", 2, []), lost, "matmul", False)[0]
    assert not row["ok"] and "no answer within" in row["error"]


def test_a_leftover_fails_a_cell_that_otherwise_passed():
    left = {"operations": 0, "instances": ["inst-7"], "error": None}
    c = cell("tiered", 1, [part("host1", single_result(), leftovers=left)])
    row = rows_by(burst.rows_of(results([c], hosts=("host1",)))[0])[("tiered", 1, "host1")]
    assert row["ok_instances"] == 1 and not row["ok"] and "inst-7" in row["error"] and row["leftover_instances"] == 1
    busy_agent = {"operations": 2, "instances": [], "error": None}
    c = cell("tiered", 1, [part("host1", single_result(), leftovers=busy_agent)])
    row = rows_by(burst.rows_of(results([c], hosts=("host1",)))[0])[("tiered", 1, "host1")]
    assert not row["ok"] and "2 function operations in flight" in row["error"]
    # A host skipped for the cell is still checked.
    skipped = cell("tiered", 1, [{"host": "host1", "skipped": "private copy", "leftovers": busy_agent}])
    assert not rows_by(burst.rows_of(results([skipped], hosts=("host1",)))[0])[("tiered", 1, "all")]["ok"]


def test_ratios_against_the_baseline_and_growth_with_the_instance_count():
    cells = [two_hosts("criu-eager", 1, answered=(400.0, 400.0), anon=40 * MiB),
             two_hosts("criu-eager", 4, answered=(800.0, 800.0), anon=40 * MiB),
             two_hosts("tiered", 1, answered=(100.0, 100.0), anon=4 * MiB),
             two_hosts("tiered", 4, answered=(200.0, 200.0), anon=4 * MiB)]
    rows = rows_by(burst.rows_of(results(cells, policies=("tiered", "criu-eager")))[0])
    t4 = rows[("tiered", 4, "all")]
    assert t4["baseline"] == "criu-eager"  # preferred even when listed second
    assert t4["last_answer_vs_baseline_pct"] == round(100 * 203 / 803, 1)
    assert t4["local_anonymous_vs_baseline_pct"] == 10.0
    assert t4["last_answer_growth_x"] == round(203 / 100, 2) and t4["local_anonymous_growth_x"] == 4.0
    assert rows[("tiered", 1, "all")]["last_answer_growth_x"] == 1.0
    assert rows[("criu-eager", 4, "host0")]["last_answer_vs_baseline_pct"] == 100.0
    no_eager = rows_by(burst.rows_of(results(cells[2:], policies=("tiered", "reap")))[0])
    assert no_eager[("tiered", 4, "all")]["baseline"] == "tiered"


def test_no_ratio_against_a_failed_baseline_or_other_hosts():
    failed_base = cell("criu-eager", 2, [part("host0", burst_result(
        [instance(0, "host0", "criu-eager"), instance(1, "host0", "criu-eager", digest_ok=False)], "host0")),
        part("host1", burst_result([instance(i, "host1", "criu-eager") for i in range(2)]))])
    rows = rows_by(burst.rows_of(results([failed_base, two_hosts("tiered", 2)]))[0])
    assert rows[("tiered", 2, "host0")]["last_answer_vs_baseline_pct"] is None
    assert rows[("tiered", 2, "host1")]["last_answer_vs_baseline_pct"] is not None
    assert rows[("tiered", 2, "all")]["last_answer_vs_baseline_pct"] is None
    # tiered skipped on host1: its "all" row covers one host, criu-eager's two; no ratio between them.
    one_host = cell("tiered", 2, [part("host0", burst_result([instance(i, "host0") for i in range(2)], "host0")),
                                  {"host": "host1", "skipped": "its tiered copy is private to host0",
                                   "leftovers": {"operations": 0, "instances": [], "error": None}}])
    rows = rows_by(burst.rows_of(results([two_hosts("criu-eager", 2), one_host]))[0])
    assert rows[("tiered", 2, "all")]["ok"] and rows[("tiered", 2, "all")]["hosts"] == 1
    assert rows[("tiered", 2, "all")]["last_answer_vs_baseline_pct"] is None
    assert rows[("tiered", 2, "host0")]["last_answer_vs_baseline_pct"] is not None


# ---------------------------------------------------------------- outputs
MIXED = [two_hosts("criu-eager", 1), two_hosts("criu-eager", 2), two_hosts("tiered", 1),
         cell("tiered", 2, [part("host0", burst_result([instance(0, "host0"), instance(1, "host0", ok=False,
                                                                                        answer_ok=None)], "host0")),
                            part("host1", burst_result([instance(i, "host1") for i in range(2)]))])]


def test_csv_has_a_row_per_policy_instances_host_and_one_all_row_per_cell(tmp_path):
    rows = burst.write_outputs(tmp_path, results(MIXED))
    with open(tmp_path / "burst.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == len(MIXED) * 3
    assert sum(r["host"] == "all" for r in table) == len(MIXED)
    header = list(table[0])
    for column in ("policy", "instances", "host", "ok", "first_answer_ms", "last_answer_ms", "instances_per_s",
                   "local_anonymous_bytes", "local_anonymous_MiB", "local_anonymous_per_instance_MiB",
                   "bytes_cxl", "bytes_rdma", "busy", "failed", "leftover_instances", "baseline",
                   "last_answer_vs_baseline_pct", "local_anonymous_vs_baseline_pct", "error"):
        assert column in header
    # Every number column says its unit (or is a count, a rate, a ratio).
    units = ("_ms", "_bytes", "_MiB", "_per_s", "_pct", "_x")
    counts = {"instances", "hosts", "requested", "answered", "ok_instances", "failed", "busy", "missing",
              "faults_total", "leftover_operations", "leftover_instances", "agent_threads_added"}
    assert all(c.endswith(units) or c.startswith("bytes_") or c in counts for c in header
               if table[0][c] and table[0][c].replace(".", "").isdigit())
    bad = next(r for r in table if (r["policy"], r["instances"], r["host"]) == ("tiered", "2", "host0"))
    assert bad["ok"] == "false" and bad["failed"] == "1" and "instance 1" in bad["error"]
    assert next(r for r in table if (r["policy"], r["instances"], r["host"]) == ("tiered", "2", "all"))["ok"] == "false"
    with open(tmp_path / "instances.csv") as f:
        instances = list(csv.DictReader(f))
    assert len(instances) == 2 * (1 + 2 + 1 + 2)
    assert {"index", "busy", "answered_at_ms", "first_response_ms", "local_anonymous_bytes", "digest_ok"} <= set(instances[0])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["cells"] == MIXED and len(doc["rows"]) == len(rows) and doc["function"] == "matmul"


def test_table_is_markdown_and_names_the_failures():
    res = results(MIXED)
    rows, _ = burst.rows_of(res)
    lines = burst.render_table(res, rows).splitlines()
    assert "snapshot on host0, restored on host0, host1 at once" in lines[0]
    table = [l for l in lines if l.startswith("|")]
    assert "last vs criu-eager" in table[0] and set(table[1]) <= set("|-:")
    assert len(table) == 2 + len(MIXED) and all(l.count("|") == table[0].count("|") for l in table)
    tiered2 = next(l for l in table if l.startswith("| tiered | 2 |"))
    assert "| FAIL |" in tiered2 and "| 3/1/0 |" in tiered2
    assert any(l.startswith("  tiered x2 on host0: instance 1: criu restore failed") for l in lines)
    assert lines[-1].startswith("burst: 3 passed, 1 failed")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = burst.plot(results(MIXED), tmp_path / "burst.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- whole runs against a fake agent
class FakeAgents:
    """Answers tierctl like the agents would. A restore waits (bounded) until every host's request
    has arrived, so a run that sent them one after another would fail. `leak` leaves an instance
    alive on host1 after a burst of that many; `kept` is alive before the run."""

    def __init__(self, hosts=("host0", "host1"), leak=None, kept=(), published=True, busy_over=None,
                 instances_supported=True):
        self.calls, self.lock = [], threading.Lock()
        self.arrived = threading.Barrier(len(hosts))
        self.leak, self.kept, self.published, self.busy_over = leak, list(kept), published, busy_over
        self.instances_supported = instances_supported
        self.leaked = []

    def __call__(self, topo, host, command, timeout=None):
        with self.lock:
            self.calls.append((host, command, timeout))
        words = command.split()
        op = words[words.index("--json") + 1]
        out, rc = {}, 0
        if op == "status":
            out = {"host": host, "policies": [{"name": p, "placement": "tiered" if p == "tiered" else "cxl",
                                               "missing": None} for p in ("criu-eager", "reap", "tiered")]}
        elif op == "instances":
            if not self.instances_supported:
                return subprocess.CompletedProcess(command, 2, "", "tierctl: unknown command 'instances'\n")
            alive = self.kept + (self.leaked if host == "host1" else [])
            out = {"host": host, "operations": 0, "max_operations": 8,
                   "instances": [{"id": i, "snapshot": "s", "policy": "reap", "pid": 9, "socket": "/x",
                                  "started_unix_ms": 1, "alive": True} for i in alive]}
        elif op == "snapshot":
            sid = words[words.index("--id") + 1]
            out = {"id": sid, "pages": 100, "digest": "ab" * 32,
                   "variants": [{"id": sid, "placement": "tiered", "cold_tier": "rdma" if self.published else "file",
                                 "published": self.published},
                                {"id": f"{sid}:cxl", "placement": "cxl", "cold_tier": "cxl", "published": True}]}
        elif op == "restore":
            self.arrived.wait(timeout=10)  # BrokenBarrierError unless every host's request is in flight
            policy = words[words.index("--policy") + 1]
            n = int(words[words.index("--instances") + 1]) if "--instances" in words else None
            if n is None:
                out = single_result(host, policy)
            else:
                out = burst_result([instance(i, host, policy, busy=self.busy_over is not None and i >= self.busy_over)
                                    for i in range(n)], host, policy)
            if self.leak == n and host == "host1":
                self.leaked.append(f"{policy}-{n}-leaked")
        return subprocess.CompletedProcess(command, rc, json.dumps(out), "")


def plan(tmp_path, policies=("criu-eager", "tiered"), counts=(1, 4), hosts=("host0", "host1"), allow_busy=False):
    return burst.BurstPlan(function="matmul", policies=list(policies), instance_counts=list(counts),
                           hosts=list(hosts), out_dir=tmp_path / "out", allow_busy=allow_busy)


def test_a_whole_burst_restores_on_every_host_at_once_and_passes(tmp_path, capsys):
    fake = FakeAgents()
    rc = burst.run_burst(DEFAULT, plan(tmp_path), run=fake, ensure_agents=lambda t: None, leftover_grace_s=0)
    assert rc == 0
    snaps = [c for c in fake.calls if " snapshot " in c[1]]
    restores = [c for c in fake.calls if " restore " in c[1]]
    assert len(snaps) == 1 and snaps[0][0] == "host0"  # one snapshot, on the first host
    assert len(restores) == 2 * 2 * 2 and {h for h, _, _ in restores} == {"host0", "host1"}
    assert not any("--host " in c for _, c, _ in restores)  # each host's own agent restores
    four = [t for _, c, t in restores if "--instances 4" in c]
    one = [t for _, c, t in restores if "--instances 1" in c]
    assert len(four) == len(one) == 4 and min(four) > max(one)  # the timeout grows with the burst
    assert any(" delete " in c for _, c, _ in fake.calls)
    assert sum(" instances" in c for _, c, _ in fake.calls) >= 2 * (1 + 4)  # before the run, after each cell
    captured = capsys.readouterr()
    assert sum(l.split("] ", 1)[-1].startswith("ok   ") for l in captured.err.splitlines()) == 4  # one per cell
    assert "burst: 4 passed, 0 failed" in captured.out
    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text())
    assert doc["topology"] == "default" and doc["backend"] == "qemu" and "commit" in doc["git"] and doc["date"]
    assert doc["snapshot"]["host"] == "host0" and len(doc["cells"]) == 4
    assert all(len(c["hosts"]) == 2 for c in doc["cells"])
    assert (out / "burst.csv").exists() and (out / "instances.csv").exists()
    every = rows_by(doc["rows"])[("tiered", 4, "all")]
    assert every["ok_instances"] == 8 and every["local_anonymous_bytes"] == 8 * 4 * MiB
    assert cli.main(["burst", "--plot", str(out)]) == 0 and (out / "burst.png").exists()


def test_an_instance_left_alive_fails_the_run_but_one_kept_before_does_not(tmp_path, capsys):
    fake = FakeAgents(leak=4, kept=["kept-by-someone"])
    rc = burst.run_burst(DEFAULT, plan(tmp_path), run=fake, ensure_agents=lambda t: None, leftover_grace_s=0)
    assert rc == 1
    rows = rows_by(json.loads((tmp_path / "out" / "results.json").read_text())["rows"])
    assert rows[("criu-eager", 1, "all")]["ok"]  # the kept instance is not this run's
    leaked = rows[("criu-eager", 4, "host1")]
    assert not leaked["ok"] and leaked["ok_instances"] == 4 and "criu-eager-4-leaked" in leaked["error"]
    assert rows[("criu-eager", 4, "host0")]["ok"]
    assert "kept-by-someone" not in (leaked["error"] or "")
    # Each leak fails the cell that left it, not every cell after it.
    later = rows[("tiered", 4, "host1")]
    assert not later["ok"] and "tiered-4-leaked" in later["error"] and "criu-eager-4-leaked" not in later["error"]


def test_busy_instances_fail_the_run_unless_allowed(tmp_path):
    strict = burst.run_burst(DEFAULT, plan(tmp_path, counts=(4,)), run=FakeAgents(busy_over=3),
                             ensure_agents=lambda t: None, leftover_grace_s=0)
    lenient = burst.run_burst(DEFAULT, plan(tmp_path, counts=(4,), allow_busy=True), run=FakeAgents(busy_over=3),
                              ensure_agents=lambda t: None, leftover_grace_s=0)
    assert (strict, lenient) == (1, 0)


def test_a_private_copy_is_skipped_on_the_other_hosts(tmp_path):
    fake = FakeAgents(hosts=("host0",), published=False)  # only host0 restores tiered: one at the barrier
    fake.arrived = threading.Barrier(1)
    fake_two = FakeAgents(published=False)

    def run(topo, host, command, timeout=None):
        # criu-eager reads the published cxl copy on both hosts; tiered only on host0.
        return (fake_two if "--policy criu-eager" in command else fake)(topo, host, command, timeout)
    rc = burst.run_burst(NATIVE, plan(tmp_path, counts=(2,)), run=run, ensure_agents=lambda t: None,
                         leftover_grace_s=0)
    assert rc == 0
    assert not any(h == "host1" and "--policy tiered" in c for h, c, _ in fake.calls + fake_two.calls)
    rows = rows_by(json.loads((tmp_path / "out" / "results.json").read_text())["rows"])
    assert "private to host0" in rows[("tiered", 2, "host1")]["skipped"]
    assert rows[("tiered", 2, "all")]["hosts"] == 1 and rows[("criu-eager", 2, "all")]["hosts"] == 2


def test_an_agent_that_cannot_list_its_instances_stops_the_run_before_the_snapshot(tmp_path):
    fake = FakeAgents(instances_supported=False)
    with pytest.raises(launcher.TestbedError, match="tierctl instances"):
        burst.run_burst(DEFAULT, plan(tmp_path), run=fake, ensure_agents=lambda t: None, leftover_grace_s=0)
    assert not any(" snapshot " in c for _, c, _ in fake.calls)


def test_a_policy_the_agent_does_not_serve_stops_the_run(tmp_path):
    fake = FakeAgents()
    with pytest.raises(launcher.TestbedError, match="does not serve lazy-cxl"):
        burst.run_burst(DEFAULT, plan(tmp_path, policies=("lazy-cxl",)), run=fake, ensure_agents=lambda t: None)
    assert not any(" snapshot " in c or " restore " in c for _, c, _ in fake.calls)


def test_a_failed_snapshot_fails_every_cell(tmp_path):
    def run(topo, host, command, timeout=None):
        if " snapshot " in command:
            return subprocess.CompletedProcess(command, 1, "", "error: criu dump failed: exit 1\n")
        return FakeAgents()(topo, host, command, timeout)
    rc = burst.run_burst(DEFAULT, plan(tmp_path), run=run, ensure_agents=lambda t: None, leftover_grace_s=0)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rc == 1 and rows and all(not r["ok"] and "snapshot failed" in r["error"] for r in rows)
