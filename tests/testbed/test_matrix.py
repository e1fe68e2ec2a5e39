"""tb matrix without QEMU: rows, CSV, table and ratios from synthetic tierctl objects; argument
checks that stop before any guest is contacted; the exit rule; the agent configs it relies on."""
import csv
import json
import os
import subprocess
import tomllib

import pytest

from conftest import REPO
from snaptier_testbed import matrix
from snaptier_testbed.agents import agent_config
from snaptier_testbed.topology import load_topology, parse_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]
DEFAULT = load_topology(REPO / "testbed/topologies/default.toml")


def restore(policy, function="helloworld", faults=1000, first=100.0, ok=True, answer_ok=True, digest_ok=True,
            tiers=("cxl",), host="host1", **extra):
    doc = {"snapshot": function, "function": function, "policy": policy, "host": host, "ok": ok,
           "error": None if ok else "criu restore failed: exit 1", "answer_ok": answer_ok, "problems": [],
           "digest_ok": digest_ok, "restore_ms": 800.0 + first, "first_response_ms": first,
           "faults": {"total": faults, "read": faults - 150, "write": 150, "zero": 12,
                      "per_tier": {t: faults // len(tiers) for t in tiers}},
           "bytes_moved_per_tier": {t: 4096 * faults // len(tiers) for t in tiers}, "pages_prefetched": 0,
           "pages_background": 0, "zero_pages": 321, "local_memory_bytes": 25 * 2**20,
           "snapshot_bytes_per_tier": {t: 45_000_000 for t in tiers}}
    doc.update(extra)
    return doc


def cell(policy, function="helloworld", error=None, **kw):
    return {"function": function, "policy": policy, "snapshot_id": function, "snapshot_host": "host0",
            "restore_host": "host1", "tierctl_rc": 0 if error is None else 1, "error": error,
            "restore": None if error else restore(policy, function, **kw)}


def results(cells):
    return {"topology": "default", "hosts": {"snapshot": "host0", "restore": "host1"}, "cells": cells}


GOOD = [cell("criu-eager", faults=0, first=400.0, tiers=("local",)), cell("lazy-cxl", faults=1000, first=120.0),
        cell("lazy-rdma", faults=1000, first=300.0, tiers=("rdma",)),
        cell("tiered", faults=850, first=100.0, tiers=("cxl", "rdma"))]


def by_policy(rows, function="helloworld"):
    return {r["policy"]: r for r in rows if r["function"] == function}


# ---------------------------------------------------------------- rows and ratios
def test_rows_carry_the_numbers_and_the_ratios():
    rows = by_policy(matrix.rows_of(results(GOOD)))
    t = rows["tiered"]
    assert t["ok"] and t["error"] is None
    assert (t["faults_total"], t["faults_read"], t["faults_write"], t["faults_cxl"], t["faults_rdma"]) == (850, 700, 150, 425, 425)
    assert t["bytes_cxl"] == 425 * 4096 and t["local_memory_bytes"] == 25 * 2**20
    assert t["faults_vs_lazy_cxl_pct"] == 85.0
    assert t["local_anonymous_bytes"] is None and t["cow_copies_after_first_response"] is None
    assert t["speedup_vs_criu_eager"] == 4.0
    assert rows["lazy-cxl"]["faults_vs_lazy_cxl_pct"] == 100.0
    # A zero baseline has no meaningful percentage.
    assert rows["criu-eager"]["faults_vs_lazy_cxl_pct"] == 0.0
    assert matrix.exit_status(list(rows.values())) == 0


def test_rows_carry_the_in_place_memory_of_a_restore():
    mapped = cell("tiered", tiers=("cxl", "rdma"), local_anonymous_bytes=3 * 2**20,
                  pages_mapped_in_place=9000, cow_copies_after_first_response=7)
    t = by_policy(matrix.rows_of(results([mapped])))["tiered"]
    assert (t["local_anonymous_bytes"], t["pages_mapped_in_place"], t["cow_copies_after_first_response"]) == (3 * 2**20, 9000, 7)


def test_missing_or_failed_baseline_gives_no_ratio():
    rows = by_policy(matrix.rows_of(results([cell("tiered", faults=850)])))
    assert rows["tiered"]["ok"]
    assert rows["tiered"]["faults_vs_lazy_cxl_pct"] is None and rows["tiered"]["speedup_vs_criu_eager"] is None
    failed_base = [cell("lazy-cxl", error="cannot reach the agent"), cell("tiered", faults=850)]
    rows = by_policy(matrix.rows_of(results(failed_base)))
    assert rows["tiered"]["faults_vs_lazy_cxl_pct"] is None
    zero_base = [cell("criu-eager", first=0.0), cell("tiered")]
    assert by_policy(matrix.rows_of(results(zero_base)))["tiered"]["speedup_vs_criu_eager"] is None


def limited(policy, first, bare, warm, function="helloworld", **kw):
    return cell(policy, function=function, first=first, bare_restore_ms=bare, warm_invoke_ms=warm, **kw)


def test_the_limit_is_the_median_bare_restore_plus_criu_eagers_warm_invocation():
    cells = [limited("criu-eager", 400.0, 52.0, 9.0), limited("criu-lazy", 300.0, 50.0, 11.0),
             limited("reap", 75.0, 55.0, 10.0), limited("tiered", 66.0, 51.0, 12.0),
             # a failed cell's numbers do not make the limit
             limited("lazy-cxl", 1.0, 1.0, 1.0, ok=False, answer_ok=None, digest_ok=None),
             limited("reap", 30.0, 20.0, 4.0, function="matmul"), limited("criu-eager", 90.0, 22.0, 5.0, function="matmul")]
    rows = matrix.rows_of(results(cells))
    lim = matrix.limits(rows)
    assert (lim["helloworld"]["bare_restore_ms"], lim["helloworld"]["warm_invoke_ms"], lim["helloworld"]["limit_ms"]) == (51.5, 9.0, 60.5)
    assert (lim["matmul"]["bare_restore_ms"], lim["matmul"]["warm_invoke_ms"], lim["matmul"]["limit_ms"]) == (21.0, 5.0, 26.0)
    assert lim["matmul"]["warm_from"] == "criu-eager"
    hw = by_policy(rows)
    assert hw["tiered"]["first_response_vs_limit"] == round(66 / 60.5, 3)
    assert hw["tiered"]["speedup_vs_criu_eager"] == round(400 / 66, 3)
    assert hw["tiered"]["speedup_vs_criu_lazy"] == round(300 / 66, 3)
    assert hw["lazy-cxl"]["first_response_vs_limit"] is None
    doc = matrix.summary(rows)
    # geo-mean of reap's two ratios to the limit; its worst one
    assert doc["policies"]["reap"]["vs_limit_geo_mean"] == round((round(75 / 60.5, 3) * round(30 / 26, 3)) ** 0.5, 3)
    assert doc["policies"]["reap"]["vs_limit_max"] == round(75 / 60.5, 3)
    assert doc["functions"]["helloworld"]["best_policy"] == "tiered"
    assert doc["functions"]["matmul"]["best_policy"] == "reap"
    assert doc["best"]["functions"] == 2
    assert doc["best"]["vs_limit_geo_mean"] == round((round(66 / 60.5, 3) * round(30 / 26, 3)) ** 0.5, 3)
    text = matrix.render_table(results(cells), rows)
    assert "first response against the limit" in text and "helloworld tiered 1.09x of 60.5 ms" in text


def test_without_criu_eager_the_warm_half_is_the_median_of_the_cells():
    cells = [limited("reap", 75.0, 55.0, 10.0), limited("tiered", 66.0, 51.0, 12.0), limited("trenv", 70.0, 53.0, 20.0)]
    lim = matrix.limits(matrix.rows_of(results(cells)))["helloworld"]
    assert (lim["bare_restore_ms"], lim["warm_invoke_ms"], lim["warm_from"]) == (53.0, 12.0, "median of the cells")


def test_repeated_cells_carry_the_medians_and_fail_if_any_repetition_failed():
    reps = [cell("reap", first=f, bare_restore_ms=b, warm_invoke_ms=w) for f, b, w in ((90.0, 50.0, 9.0), (60.0, 40.0, 7.0), (70.0, 45.0, 8.0))]
    combined = matrix.combine_repeats(reps)
    assert combined["restore"]["first_response_ms"] == 70.0  # the median repetition's own result
    row = matrix.row_of(combined)
    assert (row["repeats"], row["first_response_ms"], row["first_response_ms_min"], row["first_response_ms_max"]) == (3, 70.0, 60.0, 90.0)
    assert (row["bare_restore_ms"], row["warm_invoke_ms"]) == (45.0, 8.0)
    failed = matrix.combine_repeats(reps[:2] + [cell("reap", ok=False, answer_ok=None, digest_ok=None)])
    assert not matrix.row_of(failed)["ok"] and matrix.row_of(failed)["repeats"] == 3


def test_no_limit_without_a_bare_restore_or_a_warm_invocation():
    cells = [limited("reap", 75.0, None, 10.0), limited("tiered", 66.0, None, 12.0)]
    rows = matrix.rows_of(results(cells))
    assert matrix.limits(rows) == {} and all(r["first_response_vs_limit"] is None for r in rows)
    assert "against the limit" not in matrix.render_table(results(cells), rows)


@pytest.mark.parametrize("kw,message", [
    ({"ok": False, "answer_ok": None, "digest_ok": None}, "criu restore failed: exit 1"),
    ({"answer_ok": False}, "wrong answer"),
    ({"digest_ok": False}, "state digest differs"),
    ({"digest_ok": None}, "state digest not checked"),
    ({"host": "host0"}, "restored on host0, not on host1"),
    ({"problems": ["output.message: expected 'Hello, snaptier!'"], "answer_ok": False}, "expected 'Hello"),
])
def test_a_cell_passes_only_if_ok_answer_and_digest(kw, message):
    rows = matrix.rows_of(results([cell("lazy-cxl", **kw), cell("tiered")]))
    bad = by_policy(rows)["lazy-cxl"]
    assert not bad["ok"] and message in bad["error"]
    assert bad["faults_vs_lazy_cxl_pct"] is None and by_policy(rows)["tiered"]["faults_vs_lazy_cxl_pct"] is None
    assert matrix.exit_status(rows) == 1


def test_a_lazy_server_restore_that_left_no_page_to_the_server_fails():
    schema = json.loads((REPO / "docs/schema/control.schema.json").read_text())
    assert matrix.LAZY_SERVER_MECHANISM in schema["$defs"]["FunctionRestoreResult"]["properties"]["mechanism"]["enum"]
    lazy = {"mechanism": matrix.LAZY_SERVER_MECHANISM}
    rows = matrix.rows_of(results([
        cell("lazy-cxl", lazy_pages=0, pages_mapped_in_place=0, **lazy),              # CRIU restored every page
        cell("trenv", lazy_pages=0, pages_mapped_in_place=2036, **lazy),              # mapped them all in place
        cell("reap", lazy_pages=2036, pages_mapped_in_place=0, **lazy),
        cell("criu-eager", lazy_pages=0, mechanism="criu-eager")]))
    got = by_policy(rows)
    assert not got["lazy-cxl"]["ok"] and "no page was left to the agent's lazy-pages server" in got["lazy-cxl"]["error"]
    assert got["trenv"]["ok"] and got["reap"]["ok"] and got["criu-eager"]["ok"]


def test_exit_status_of_an_empty_matrix_is_failure():
    assert matrix.exit_status([]) == 1


# ---------------------------------------------------------------- CSV and table
MIXED = GOOD + [cell("lazy-cxl", function="pyaes", error="snapshot failed: criu dump: exit 1"),
                cell("tiered", function="pyaes", ok=False, answer_ok=None, digest_ok=None)]


def test_csv_has_one_row_per_cell_with_units_in_the_header(tmp_path):
    rows = matrix.write_outputs(tmp_path, results(MIXED))
    with open(tmp_path / "matrix.csv") as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    for column in ("restore_ms", "first_response_ms", "faults_total", "faults_read", "faults_write", "faults_cxl",
                   "faults_rdma", "bytes_cxl", "bytes_rdma", "bytes_local", "pages_prefetched", "zero_pages",
                   "local_memory_bytes", "local_anonymous_bytes", "pages_mapped_in_place",
                   "cow_copies_after_first_response", "answer_ok", "digest_ok", "error", "faults_vs_lazy_cxl_pct"):
        assert column in header
    assert header.index("faults_cxl") < header.index("faults_rdma") < header.index("faults_local")
    assert len(table) == len(MIXED) == len(rows)
    tiered = next(r for r in table if r["function"] == "helloworld" and r["policy"] == "tiered")
    assert (tiered["ok"], tiered["faults_total"], tiered["faults_vs_lazy_cxl_pct"], tiered["digest_ok"]) == ("true", "850", "85.0", "true")
    snapfail = next(r for r in table if r["function"] == "pyaes" and r["policy"] == "lazy-cxl")
    assert snapfail["ok"] == "false" and snapfail["restore_ms"] == "" and "criu dump" in snapfail["error"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["cells"] == MIXED and len(doc["rows"]) == len(MIXED)


def test_table_is_readable_and_names_the_failures():
    res = results(MIXED)
    text = matrix.render_table(res, matrix.rows_of(res))
    lines = text.splitlines()
    assert "snapshots on host0, restored on host1" in lines[0]
    assert "faults vs lazy-cxl" in lines[1] and "vs limit" in lines[1] and "x eager" in lines[1]
    tiered = next(l for l in lines if "helloworld" in l and " tiered " in l)
    assert tiered.split()[2] == "ok" and "85%" in tiered and "4.00x" in tiered
    pyaes = [l for l in lines if l.startswith("  pyaes ")]
    assert len(pyaes) == 2 and all(l.split()[2] == "FAIL" for l in pyaes)
    assert "" in lines  # a blank line between functions
    assert "    pyaes lazy-cxl: snapshot failed: criu dump: exit 1" in lines
    assert "    pyaes tiered: criu restore failed: exit 1" in lines
    assert lines[-1] == "matrix: 4 passed, 2 failed"
    assert max(len(l) for l in lines if "failed:" not in l and not l.startswith("restore matrix")) < 170


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = matrix.plot(results(MIXED), tmp_path / "matrix.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- arguments
def test_defaults_are_every_function_folder_and_every_policy_in_order():
    functions = matrix.available_functions()
    assert "helloworld" in functions and functions == sorted(functions)
    assert all((REPO / "workloads" / f / "function.toml").is_file() for f in functions)
    assert "runtime" not in functions and "tests" not in functions
    known = matrix.known_policies()
    assert {"criu-eager", "lazy-cxl", "reap", "tiered"} <= set(known) and len(set(known)) == len(known)
    assert matrix.parse_list("tiered, lazy-cxl,tiered", known, "policy", "--policies") == ["tiered", "lazy-cxl"]
    assert matrix.pick_hosts(DEFAULT, None, None) == ("host0", "host1")
    assert matrix.pick_hosts(DEFAULT, "host1", None) == ("host1", "host0")


def _refuse(**kw):
    raise AssertionError("a guest was contacted")


@pytest.mark.parametrize("args,message", [
    (["--policies", "lazy-cxl,eager"], "--policies: unknown policy 'eager'; known: criu-eager,"),
    (["--functions", "helloworld,nope"], "--functions: unknown function 'nope'; known: helloworld,"),
    (["--functions", ","], "--functions: empty list"),
    (["--restore-host", "mem0"], "--restore-host 'mem0' is a memory node"),
    (["--snapshot-host", "host9"], "--snapshot-host 'host9' is not a host of topology 'default'"),
])
def test_bad_arguments_exit_2_before_any_guest(args, message, capsys):
    rc = matrix.main(["matrix", *args], run=lambda *a, **k: _refuse(), ensure_agents=lambda topo: _refuse())
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed: error: ") and message in err


def test_hosts_must_share_a_link_for_forwarding():
    memnode = {"name": "m", "role": "memory", "pool": "256M"}
    topo = parse_topology({"name": "t", "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"},
                                                  memnode],
                           "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "m"]},
                                    {"name": "l1", "subnet": "10.9.1.0/24", "hosts": ["b"]}]})
    with pytest.raises(matrix.UsageError, match="b is not on a link with a"):
        matrix.pick_hosts(topo, None, None)
    assert matrix.pick_hosts(topo, "a", "a") == ("a", "a")
    lonely = parse_topology({"name": "t", "host": [{"name": "a", "role": "compute"}, memnode],
                             "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "m"]}]})
    with pytest.raises(matrix.UsageError, match="one compute host"):
        matrix.pick_hosts(lonely, None, None)


def test_tb_matrix_usage_error_through_the_entry_point(tmp_path):
    env = {**os.environ, "SNAPTIER_STATE": str(tmp_path)}
    r = subprocess.run([*TB, "matrix", "--policies", "bogus"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "unknown policy 'bogus'" in r.stderr and "not up" not in r.stderr
    r = subprocess.run([*TB, "matrix"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "is not up" in r.stderr
    assert not any(tmp_path.iterdir())  # no results directory for a run that never started


# ---------------------------------------------------------------- a whole run against a fake guest
AGENT_POLICIES = ["criu-eager", "lazy-cxl", "criu-remote", "reap", "tiered"]


def status_with_policies(host, names=AGENT_POLICIES, lacking=None):
    lacking = lacking or {}
    names = list(dict.fromkeys([*names, *lacking]))
    return {"host": host, "role": "compute", "tiers": [], "snapshots": 0, "default_tier": None,
            "policies": [{"name": n, "mechanism": "snaptier-lazy", "placement": "cxl", "tiers": [["cxl"]],
                          "in_place": "no pages", "in_place_required": False, "description": n,
                          "missing": lacking.get(n)} for n in names]}


def test_without_policies_the_matrix_runs_what_the_agent_lists_in_its_order(tmp_path):
    fake = FakeGuests()
    matrix.main(["matrix", "--functions", "helloworld", "--out", str(tmp_path / "out")], run=fake,
                ensure_agents=lambda topo: None)
    ran = [c.split("--policy ")[1].split()[0] for _, c, _ in fake.calls if " restore " in c]
    assert ran == AGENT_POLICIES
    assert json.loads((tmp_path / "out" / "results.json").read_text())["policies"] == AGENT_POLICIES


def test_a_policy_the_agent_does_not_serve_stops_the_run_before_any_snapshot(tmp_path, capsys):
    fake = FakeGuests()
    rc = matrix.main(["matrix", "--functions", "helloworld", "--policies", "lazy-cxl,trenv",
                      "--out", str(tmp_path / "out")], run=fake, ensure_agents=lambda topo: None)
    assert rc == 2 and "does not serve trenv" in capsys.readouterr().err
    assert not any(" snapshot " in c for _, c, _ in fake.calls)

class FakeGuests:
    """Answers tierctl like the agent would; pyaes's snapshot fails, reap's restore returns ok:false."""

    def __init__(self):
        self.calls = []

    def __call__(self, topo, host, command, timeout=None):
        self.calls.append((host, command, timeout))
        words = command.split()
        op = words[words.index("--json") + 1]
        out, err, rc = "", "", 0
        if op == "status":
            out = json.dumps(status_with_policies(host))
        elif op == "snapshot":
            fn, sid = words[words.index("snapshot") + 1], words[words.index("--id") + 1]
            if fn == "pyaes":
                err, rc = "error: criu dump failed: exit 1\n", 1
            else:
                out = json.dumps({"id": sid, "function": fn, "host": host, "digest": "ab" * 32, "pages": 100,
                                  "zero_pages": 3, "profile": {"hot": 10, "cold": 90},
                                  "variants": [{"id": sid, "placement": "tiered"}, {"id": f"{sid}@cxl"},
                                               {"id": f"{sid}@rdma"}]})
        elif op == "restore":
            policy = words[words.index("--policy") + 1]
            target = words[words.index("--host") + 1]
            doc = restore(policy, words[words.index("restore") + 1].rsplit("-", 1)[0], host=target,
                          ok=policy != "reap")
            out, rc = json.dumps(doc), 0 if policy != "reap" else 1
        return subprocess.CompletedProcess(command, rc, out, err)


def test_repeat_restores_each_cell_n_times_interleaved_and_a_failed_cell_once(tmp_path, capsys):
    fake = FakeGuests()
    rc = matrix.main(["matrix", "--functions", "helloworld", "--policies", "lazy-cxl,reap,tiered", "--repeat", "3",
                      "--out", str(tmp_path / "out")], run=fake, ensure_agents=lambda topo: None)
    assert rc == 1  # reap fails
    policies = [c.split("--policy ")[1].split()[0] for _, c, _ in fake.calls if " restore " in c]
    assert policies == ["lazy-cxl", "reap", "tiered", "lazy-cxl", "tiered", "lazy-cxl", "tiered"]
    assert all("--limit" in c for _, c, _ in fake.calls if " restore " in c), "the limit is measured by default"
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["policy"]: r for r in doc["rows"]}
    assert (rows["tiered"]["repeats"], rows["reap"]["repeats"]) == (3, 1) and doc["repeat"] == 3
    assert matrix.main(["matrix", "--functions", "helloworld", "--repeat", "0"]) == 2


class PrivateCopyGuests(FakeGuests):
    """The snapshot's local copy is private to its host (published false); the others are shared."""

    def __call__(self, topo, host, command, timeout=None):
        words = command.split()
        op = words[words.index("--json") + 1]
        if op == "status":
            self.calls.append((host, command, timeout))
            doc = status_with_policies(host, ["lazy-cxl", "reap-local", "tiered"])
            for p in doc["policies"]:
                p["placement"] = {"reap-local": "local", "tiered": "tiered"}.get(p["name"], "cxl")
            return subprocess.CompletedProcess(command, 0, json.dumps(doc), "")
        if op == "snapshot":
            self.calls.append((host, command, timeout))
            sid = words[words.index("--id") + 1]
            variants = [{"id": sid, "placement": "tiered", "published": True},
                        {"id": f"{sid}:cxl", "placement": "cxl", "published": True},
                        {"id": f"{sid}:local", "placement": "local", "published": False}]
            return subprocess.CompletedProcess(command, 0, json.dumps({"id": sid, "pages": 10, "variants": variants}), "")
        if op == "restore":
            self.calls.append((host, command, timeout))
            policy = words[words.index("--policy") + 1]
            target = words[words.index("--host") + 1] if "--host" in words else host
            return subprocess.CompletedProcess(command, 0, json.dumps(restore(policy, host=target)), "")
        return super().__call__(topo, host, command, timeout)


def test_a_copy_only_the_snapshot_host_holds_is_restored_there(tmp_path):
    fake = PrivateCopyGuests()
    rc = matrix.main(["matrix", "--functions", "helloworld", "--out", str(tmp_path / "out")], run=fake,
                     ensure_agents=lambda topo: None)
    assert rc == 0
    forwarded = {c.split("--policy ")[1].split()[0]: "--host host1" in c for _, c, _ in fake.calls if " restore " in c}
    assert forwarded == {"lazy-cxl": True, "reap-local": False, "tiered": True}
    rows = {r["policy"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["reap-local"]["restore_host"] == "host0" and rows["tiered"]["restore_host"] == "host1"


def test_a_whole_matrix_with_failures_is_recorded_and_exits_1(tmp_path, capsys):
    fake = FakeGuests()
    rc = matrix.main(["matrix", "--functions", "helloworld,pyaes", "--policies", "lazy-cxl,reap,tiered",
                      "--out", str(tmp_path / "out")], run=fake, ensure_agents=lambda topo: None)
    assert rc == 1
    # Everything ran on the snapshot host; restores were forwarded to host1, with long timeouts.
    assert {h for h, c, _ in fake.calls if " status" not in c} == {"host0"}
    snaps = [c for c in fake.calls if " snapshot " in c[1]]
    restores = [c for c in fake.calls if " restore " in c[1]]
    deletes = [c for c in fake.calls if " delete " in c[1]]
    assert len(snaps) == 2 and len(restores) == 3 and len(deletes) == 3
    assert all("--socket /run/snaptier/agent.sock" in c for _, c, _ in fake.calls)
    assert "--timeout-ms 900000" in snaps[0][1] and snaps[0][2] > 900
    assert all("--host host1" in c and "--timeout-ms 600000" in c and t > 600 for _, c, t in restores)
    out = capsys.readouterr().out
    assert "matrix: 2 passed, 4 failed" in out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["hosts"]["snapshot"] == "host0" and doc["hosts"]["restore"] == "host1" and doc["date"]
    assert "commit" in doc["git"] and doc["snapshots"]["pyaes"]["error"] == "error: criu dump failed: exit 1"
    rows = {(r["function"], r["policy"]): r for r in doc["rows"]}
    assert len(rows) == 6
    assert rows[("helloworld", "tiered")]["ok"] and rows[("helloworld", "tiered")]["faults_vs_lazy_cxl_pct"] == 100.0
    assert not rows[("helloworld", "reap")]["ok"] and "criu restore failed" in rows[("helloworld", "reap")]["error"]
    assert all(not rows[("pyaes", p)]["ok"] and "snapshot failed" in rows[("pyaes", p)]["error"]
               for p in ("lazy-cxl", "reap", "tiered"))
    assert (tmp_path / "out" / "matrix.csv").exists()
    # --plot redraws from the results directory alone.
    assert matrix.main(["matrix", "--plot", str(tmp_path / "out")]) == 0


# ---------------------------------------------------------------- agent configs
STATUS = {"cxl": {"device": "/dev/dax0.0"}}


def config_of(topo, host):
    return tomllib.loads(agent_config(topo, host, "t" * 32, STATUS))


def test_compute_configs_have_functions_and_every_config_has_its_peers():
    for host in ("host0", "host1"):
        cfg = config_of(DEFAULT, host)
        assert cfg["functions"] == {"workloads_dir": "/opt/snaptier/workloads", "work_dir": "/run/snaptier/functions",
                                    "operation_timeout_s": 900}
    assert config_of(DEFAULT, "host0")["peers"] == {"host1": "10.77.0.2:7400", "mem0": "10.77.0.3:7400"}
    assert config_of(DEFAULT, "host1")["peers"] == {"host0": "10.77.0.1:7400", "mem0": "10.77.0.3:7400"}
    mem = config_of(DEFAULT, "mem0")
    assert mem["peers"] == {"host0": "10.77.0.1:7400", "host1": "10.77.0.2:7400"} and "functions" not in mem


def test_peers_only_on_the_same_link_and_none_without_a_link():
    topo = parse_topology({"name": "t", "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"},
                                                 {"name": "c", "role": "compute"}, {"name": "d", "role": "compute"}],
                           "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b"], "rdma": False},
                                    {"name": "l1", "subnet": "10.9.1.0/24", "hosts": ["c"], "rdma": False}]})
    assert config_of(topo, "a")["peers"] == {"b": "10.9.0.2:7400"}
    assert "peers" not in config_of(topo, "c")   # alone on its link
    assert "peers" not in config_of(topo, "d")   # no link at all
    assert "functions" in config_of(topo, "d")


# ---------------------------------------------------------------- cells that need absent hardware
NO_POOL = parse_topology({"backend": "native", "host": [{"name": "host0", "role": "compute"},
                                                         {"name": "host1", "role": "compute"}]})
NO_POOL_LINKED = parse_topology({"name": "nl", "backend": "native",
                                 "host": [{"name": "host0", "role": "compute"}, {"name": "host1", "role": "compute"}],
                                 "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["host0", "host1"],
                                           "rdma": False}]})
NEEDS_RDMA = {"error": {"code": "unavailable",
                        "message": "placement rdma needs the rdma tier, which is not up on this host"}}


def test_a_policy_needing_a_tier_the_topology_cannot_have_is_skipped_not_failed():
    reason = matrix.skip_reason(NO_POOL, NEEDS_RDMA, "rdma")
    assert reason and "no memory node" in reason and "rdma tier" in reason
    cells = GOOD[:2] + [{**cell("lazy-rdma"), "restore": NEEDS_RDMA, "skipped": reason}]
    rows = by_policy(matrix.rows_of(results(cells)))
    assert rows["lazy-rdma"]["skipped"] == reason and rows["lazy-rdma"]["faults_vs_lazy_cxl_pct"] is None
    assert matrix.exit_status(list(rows.values())) == 0
    table = matrix.render_table(results(cells), list(rows.values()))
    assert "matrix: 2 passed, 0 failed, 1 skipped" in table and " skip " in table


def test_a_policy_refused_because_the_cxl_tier_cannot_map_in_place_is_skipped():
    refused = {"error": {"code": "unavailable",
                         "message": "policy trenv maps every stored page in place from CXL, "
                         "and this host cannot: in-place: no (devdax refuses private mappings)"}}
    reason = matrix.skip_reason(DEFAULT, refused, "in_place")
    assert reason and "devdax refuses private mappings" in reason
    assert matrix.skip_reason(DEFAULT, refused, None) is None  # the words alone decide nothing


def test_the_same_refusal_where_the_topology_has_a_pool_is_a_failure():
    assert matrix.skip_reason(DEFAULT, NEEDS_RDMA, "rdma") is None   # this topology has a pool
    other = {"error": {"code": "unavailable", "message": "the queue pair failed"}}
    assert matrix.skip_reason(NO_POOL, other, None) is None
    assert matrix.skip_reason(NO_POOL, restore("tiered"), "rdma") is None  # it ran fine


def test_skipping_follows_the_hosts_typed_policy_list_not_the_message():
    assert matrix.skip_reason(NO_POOL, NEEDS_RDMA, None) is None  # same words, the host lacks nothing
    failed = {**restore("lazy-rdma", ok=False), "error": "unavailable: the pool is gone"}
    assert "no memory node" in matrix.skip_reason(NO_POOL, failed, "rdma")
    assert not matrix.needs_peer({**failed, "error": "unavailable: needs the snapshot host 'h' as a peer"})
    assert matrix.needs_peer({**failed, "missing": "peer"})


def test_a_refused_cell_asks_the_restore_hosts_policy_list_once(tmp_path):
    calls = []

    def run(topo_, host, command, timeout=None):
        calls.append((host, command))
        if " status" in command:
            out = status_with_policies(host, [*AGENT_POLICIES, "lazy-rdma"],
                                       lacking={"lazy-rdma": "rdma"} if host == "host1" else {})
        elif " snapshot " in command:
            out = {"id": "helloworld-x", "pages": 10, "variants": []}
        else:
            out = {"error": {"code": "not_found", "message": "snapshot has no rdma copy"}}
        return subprocess.CompletedProcess(command, 1 if out.get("error") else 0, json.dumps(out), "")
    rc = matrix.run_matrix(NO_POOL_LINKED, ["helloworld"], ["lazy-rdma", "lazy-cxl"], "host0", "host1", tmp_path,
                           keep=True, run=run, ensure_agents=lambda t: None)
    rows = by_policy(matrix.rows_of(json.loads((tmp_path / "results.json").read_text())))
    assert rows["lazy-rdma"]["skipped"] and "no memory node" in rows["lazy-rdma"]["skipped"]
    assert not rows["lazy-cxl"]["skipped"] and not rows["lazy-cxl"]["ok"] and rc == 1
    assert sum(h == "host1" and " status" in c for h, c in calls) == 1


def test_without_an_rdma_pool_the_matrix_restores_on_the_snapshot_host_unless_told():
    linked = parse_topology({"backend": "native", "host": [{"name": "host0", "role": "compute"},
                                                          {"name": "host1", "role": "compute"}],
                             "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["host0", "host1"],
                                       "rdma": False}]})
    assert matrix.pick_hosts(linked, None, None) == ("host0", "host0")
    assert matrix.pick_hosts(linked, None, "host1") == ("host0", "host1")
    assert matrix.pick_hosts(DEFAULT, None, None) == ("host0", "host1")


def test_a_policy_that_needs_a_peer_is_run_on_one_when_the_matrix_restores_locally(tmp_path):
    topo = parse_topology({"name": "np", "backend": "native",
                           "host": [{"name": "host0", "role": "compute"}, {"name": "host1", "role": "compute"}],
                           "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["host0", "host1"],
                                     "rdma": False}]})
    calls = []

    def run(topo_, host, command, timeout=None):
        calls.append(command)
        if " status" in command:
            out = status_with_policies(host)
        elif " snapshot " in command:
            out = {"id": "helloworld-x", "pages": 10, "variants": []}
        elif "--policy criu-remote" in command and "--host host1" not in command:
            out = {**restore("criu-remote", ok=False, answer_ok=None, digest_ok=None, host="host0"),
                   "error": "unavailable: criu-remote needs the snapshot host 'host0' as a peer", "missing": "peer"}
        else:
            out = restore("x", host="host1" if "--host host1" in command else "host0")
        return subprocess.CompletedProcess(command, 1 if out.get("error") else 0, json.dumps(out), "")
    rc = matrix.run_matrix(topo, ["helloworld"], ["lazy-cxl", "criu-remote"], "host0", "host0", tmp_path,
                           keep=True, run=run, ensure_agents=lambda t: None)
    rows = by_policy(matrix.rows_of(json.loads((tmp_path / "results.json").read_text())))
    assert rc == 0 and rows["criu-remote"]["ok"] and rows["criu-remote"]["restore_host"] == "host1"
    assert rows["lazy-cxl"]["restore_host"] == "host0"
    assert sum("--policy criu-remote" in c for c in calls) == 2
