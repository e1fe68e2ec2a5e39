"""tb chaos without a running topology: row selection and its refusals, how a result is judged
(corrupt naming snapshot/page/tier, or not), finding and damaging pages in a backing file, the
emulated-only rows skipped natively without contacting a host, and the fill row against a fake
store, once behaving and once leaving a refused snapshot listed."""
import json
import os
import re
import subprocess

import pytest

from conftest import REPO
from snaptier_testbed import chaos
from snaptier_testbed.topology import load_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]
NATIVE = load_topology(REPO / "testbed/topologies/native.toml")
MiB = 1 << 20


# ---------------------------------------------------------------- rows
def test_every_row_by_default_and_only_keeps_the_order_given():
    assert chaos.parse_rows(None) == list(chaos.ROWS)
    assert chaos.parse_rows("fill-cxl, corrupt-cxl,fill-cxl") == ["fill-cxl", "corrupt-cxl"]


@pytest.mark.parametrize("text,message", [("nope", "unknown row 'nope'"), (",", "empty list")])
def test_bad_rows_are_refused_naming_the_known_ones(text, message):
    with pytest.raises(chaos.UsageError) as e:
        chaos.parse_rows(text)
    assert message in str(e.value) and "kill-agent-mid-restore" in str(e.value)


@pytest.mark.parametrize("args,message", [(["--only", "corrupt"], "unknown row 'corrupt'"),
                                          (["--function", "nosuch"], "unknown function 'nosuch'")])
def test_cli_refuses_bad_arguments_before_contacting_any_host(tmp_path, args, message):
    r = subprocess.run([*TB, "-t", str(REPO / "testbed/topologies/native.toml"), "chaos", *args],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SNAPTIER_STATE": str(tmp_path)})
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "native" / "chaos.json").exists()


# ---------------------------------------------------------------- judging results
CORRUPT = "corrupt: snapshot 'fn-1:cxl': page 17 (vaddr 0x7f12a000) on tier cxl fails its checksum (CRC32C 1, stored 2)"


def restore_result(ok, error=None, answer_ok=True, server=None):
    return {"ok": ok, "error": error, "answer_ok": answer_ok, "digest_ok": ok, "problems": [] if ok else [error],
            "server": {"error": server}}


@pytest.mark.parametrize("rc,doc,ok,says", [
    (0, restore_result(False, CORRUPT), True, "page 17 on tier cxl"),
    (1, {"error": {"code": "corrupt", "message": CORRUPT.split(": ", 1)[1]}}, True, "page 17"),
    # The lazy-pages server found it, the invocation saw the tree die: the cause still counts.
    (0, restore_result(False, "invoke: instance closed the connection without a response", answer_ok=False,
                       server=CORRUPT), True, "page 17"),
    (0, restore_result(True), False, "served the damaged copy"),
    (0, restore_result(False, "invoke: instance closed the connection without a response", answer_ok=False),
     False, "not as corrupt"),
    (0, restore_result(False, CORRUPT.replace("tier cxl", "tier file")), False, "tier file"),
    (0, restore_result(False, CORRUPT.replace("fn-1:cxl", "other")), False, "'other'"),
    (3, None, False, "not as corrupt"),
])
def test_a_damaged_copy_must_be_refused_as_corrupt_naming_snapshot_page_and_tier(rc, doc, ok, says):
    got, detail = chaos.judge_corrupt(rc, doc, "cannot reach the agent", {"fn-1", "fn-1:cxl"})
    assert got is ok and says in detail


def test_error_of_tells_success_from_each_kind_of_failure():
    assert chaos.error_of(0, restore_result(True), "") == (None, "")
    assert chaos.error_of(1, {"error": {"code": "no_space", "message": "arena full"}}, "x") == ("no_space", "arena full")
    assert chaos.error_of(0, restore_result(False, "timeout: no completion"), "")[0] == "timeout"
    assert chaos.error_of(3, None, "cannot reach")[0] == "transport"


# ---------------------------------------------------------------- the backing file
@pytest.mark.parametrize("base", [0, 2 * MiB])
def test_pages_are_found_and_flipped_where_the_region_lies_in_the_file(tmp_path, base):
    backing = tmp_path / "cxl.raw"
    data = bytearray(os.urandom(8 * MiB))
    data[:8] = b"\0" * 8
    data[base:base + 8] = chaos.SUPERBLOCK_MAGIC
    backing.write_bytes(data)
    assert chaos.region_base(backing) == base
    extents = [{"tier": "cxl", "offset": 8192, "bytes": 8192, "first_page": 0, "pages": 2},
               {"tier": "file", "offset": 0, "bytes": 4096, "first_page": 2, "pages": 1},
               {"tier": "cxl", "offset": 65536, "bytes": 4096, "first_page": 3, "pages": 1}]
    pages = chaos.cxl_pages(extents)
    assert pages == [8192, 12288, 65536]
    assert chaos.flip_bytes(backing, base, pages) == 3
    after = backing.read_bytes()
    changed = [i for i in range(len(data)) if after[i] != data[i]]
    assert changed == [base + p + chaos.FLIP_AT for p in pages]
    chaos.flip_bytes(backing, base, pages)
    assert backing.read_bytes() == bytes(data)


def test_no_superblock_is_a_clear_error(tmp_path):
    backing = tmp_path / "cxl.raw"
    backing.write_bytes(bytes(4 * MiB))
    with pytest.raises(chaos.TestbedError, match="no CXL directory superblock"):
        chaos.region_base(backing)


# ---------------------------------------------------------------- rows against fakes
def no_host(*_a, **_k):
    raise AssertionError("a host was contacted")


def test_memory_node_rows_are_skipped_natively_with_the_reason_and_touch_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SNAPTIER_STATE", str(tmp_path))
    rc = chaos.run_chaos(NATIVE, ["memnode-stall", "fill-rdma", "memnode-agent-restart"], run=no_host,
                         ensure_agents=no_host)
    assert rc == 0
    report = json.loads((tmp_path / "native" / "chaos.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["memnode-stall", "fill-rdma", "memnode-agent-restart"]
    assert report["skipped"] == 3 and report["failed"] == 0
    details = {r["row"]: r["checks"][0]["detail"] for r in report["rows"]}
    assert "emulated topologies only" in details["memnode-stall"] and "emulated" in details["memnode-agent-restart"]
    assert "no memory node" in details["fill-rdma"]
    out = capsys.readouterr().out
    assert re.search(r"memnode-stall: .+ skip ", out) and "chaos: 0 passed, 0 failed, 3 skipped" in out


def test_memory_node_rows_run_on_an_emulated_topology_with_one():
    default = load_topology(REPO / "testbed/topologies/default.toml")
    assert all(chaos.static_skip(default, r) is None for r in chaos.ROWS)
    assert chaos.static_skip(NATIVE, "corrupt-cxl") is None


class Proc:
    def __init__(self, rc=0, stdout="", stderr=""):
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr


class FakeStore:
    """Two agents over one CXL arena of `capacity` bytes: put / list / info / read / delete /
    status, and the shell commands the fill row runs. `leaky` keeps a refused put listed."""

    def __init__(self, capacity, leaky=False):
        self.capacity, self.leaky = capacity, leaky
        self.snapshots = {}   # id -> bytes
        self.calls = []

    def used(self):
        return sum(self.snapshots.values())

    def __call__(self, topo, host, command, timeout=None):
        self.calls.append((host, command))
        if "chaosprobe.py strays" in command:
            return Proc(stdout="[]")
        if command.startswith(("head -c", "rm -f")):
            return Proc(stdout="ab" * 32 + "  /tmp/x\n")
        m = re.search(r"--json (\w+)(?: (\S+))?", command)
        op, arg = m.group(1), m.group(2)
        if op == "ping":
            return Proc(stdout='{"pong": true}')
        if op == "status":
            return Proc(stdout=json.dumps({"tiers": [{"kind": "cxl", "up": True, "stats": {
                "capacity_bytes": self.capacity, "used_bytes": self.used()}}]}))
        if op == "put":
            if self.used() + 64 * MiB > self.capacity:
                if self.leaky:
                    self.snapshots[arg] = 0
                return Proc(1, json.dumps({"error": {"code": "no_space", "message": "put: the arena of host0 is full"}}))
            self.snapshots[arg] = 64 * MiB
            return Proc(stdout=json.dumps({"id": arg, "published": True}))
        if op == "list":
            return Proc(stdout=json.dumps({"snapshots": [{"id": i} for i in self.snapshots]}))
        if op == "info":
            if arg in self.snapshots:
                return Proc(stdout=json.dumps({"id": arg}))
            return Proc(1, json.dumps({"error": {"code": "not_found", "message": "no such snapshot"}}))
        if op == "read":
            return Proc(stdout=json.dumps({"sha256": "ab" * 32}))
        if op == "delete":
            if self.snapshots.pop(arg, None) is None:
                return Proc(1, json.dumps({"error": {"code": "not_found", "message": "gone"}}))
            return Proc(stdout=json.dumps({"deleted": True}))
        raise AssertionError(f"unexpected command {command}")


def fill(tmp_path, monkeypatch, store):
    monkeypatch.setenv("SNAPTIER_STATE", str(tmp_path))
    rc = chaos.run_chaos(NATIVE, ["fill-cxl"], run=store, ensure_agents=lambda topo: None)
    report = json.loads((tmp_path / "native" / "chaos.json").read_text())
    return rc, {c["check"].split(": ", 1)[1]: c for c in report["rows"][0]["checks"]}


def test_fill_finds_the_refusal_checks_consistency_and_reuses_the_space(tmp_path, monkeypatch):
    store = FakeStore(capacity=200 * MiB)
    rc, checks = fill(tmp_path, monkeypatch, store)
    assert rc == 0, checks
    assert "after 3 puts (192 MiB" in checks["a clear no space"]["detail"]
    assert checks["nothing half published"]["ok"]
    assert checks["space usable again after deleting"]["ok"]
    assert checks["testbed healthy afterwards"]["ok"]
    assert store.snapshots == {}, "everything the row stored is deleted"
    # Both hosts of the device were asked what they list.
    assert {h for h, c in store.calls if "--json list" in c} == {"host0", "host1"}


def test_fill_fails_when_a_refused_snapshot_stays_listed(tmp_path, monkeypatch):
    rc, checks = fill(tmp_path, monkeypatch, FakeStore(capacity=200 * MiB, leaky=True))
    assert rc == 1
    assert checks["a clear no space"]["ok"]
    assert not checks["nothing half published"]["ok"]
    assert "lists the refused" in checks["nothing half published"]["detail"]


class FakeCxlStore:
    """Snapshots whose CXL pages lie in a real backing file: restores and reads check those
    bytes (as the agent's CRC32C does) and answer corrupt naming the first damaged page."""

    POLICIES_ON_TIERED = ("aquifer", "tiered")
    # As an agent lists them (tierctl status): one that reads only the RDMA pool, one mapping in place.
    POLICIES = [{"name": "criu-eager", "placement": "cxl"}, {"name": "criu-remote", "placement": "cxl"},
                {"name": "lazy-rdma", "placement": "rdma"}, {"name": "reap", "placement": "cxl"},
                {"name": "aquifer", "placement": "tiered"}, {"name": "faasnap", "placement": "cxl"},
                {"name": "cxlfork", "placement": "cxl", "in_place_required": True},
                {"name": "tiered", "placement": "tiered"}]

    def __init__(self, backing):
        self.backing = backing
        self.copies = {}     # copy id -> (offset, pages, digest of the pages)
        self.next_offset = 1 << 20

    def _store(self, cid, pages):
        data = os.urandom(pages * 4096)
        with open(self.backing, "r+b") as f:
            f.seek(self.next_offset)
            f.write(data)
        self.copies[cid] = (self.next_offset, pages, [data[i * 4096:(i + 1) * 4096] for i in range(pages)])
        self.next_offset += pages * 4096 + 8192

    def _check(self, cid):
        offset, pages, want = self.copies[cid]
        with open(self.backing, "rb") as f:
            f.seek(offset)
            got = f.read(pages * 4096)
        for i in range(pages):
            if got[i * 4096:(i + 1) * 4096] != want[i]:
                return f"corrupt: snapshot '{cid}': page {i} (vaddr 0x{0x7f0000 + i:x}000) on tier cxl fails its checksum"
        return None

    def __call__(self, topo, host, command, timeout=None):
        if "chaosprobe.py strays" in command:
            return Proc(stdout="[]")
        m = re.search(r"--json (\w+)(?: (\S+))?", command)
        op, arg = m.group(1), m.group(2)
        if op in ("ping", "status", "list"):
            return Proc(stdout=json.dumps({"pong": True, "tiers": [], "snapshots": [], "policies": self.POLICIES}))
        if op == "snapshot":
            sid = re.search(r"--id (\S+)", command).group(1)
            self._store(sid, 3)
            self._store(sid + ":cxl", 5)
            return Proc(stdout=json.dumps({"id": sid, "pages": 8, "variants": [
                {"id": sid, "published": False}, {"id": sid + ":cxl", "published": True}]}))
        if op == "info":
            offset, pages, _ = self.copies[arg]
            return Proc(stdout=json.dumps({"id": arg, "extents": [
                {"tier": "file", "offset": 0, "bytes": 4096, "first_page": 0, "pages": 1},
                {"tier": "cxl", "offset": offset, "bytes": pages * 4096, "first_page": 1, "pages": pages}]}))
        if op in ("read", "restore"):
            policy = re.search(r"--policy (\S+)", command)
            cid = arg if op == "read" else arg + ("" if policy.group(1) in self.POLICIES_ON_TIERED else ":cxl")
            bad = self._check(cid)
            if op == "read":
                return Proc(1, json.dumps({"error": {"code": "corrupt", "message": bad.split(": ", 1)[1]}})) if bad \
                    else Proc(stdout=json.dumps({"sha256": "x"}))
            return Proc(stdout=json.dumps({"ok": bad is None, "error": bad, "answer_ok": bad is None,
                                           "digest_ok": bad is None, "first_response_ms": 5.0, "problems": []}))
        if op == "delete":
            self.copies.pop(arg, None)
            return Proc(stdout='{"deleted": true}')
        raise AssertionError(f"unexpected command {command}")


def test_corrupt_cxl_damages_exactly_the_cxl_pages_and_every_reader_must_refuse(tmp_path, monkeypatch):
    from snaptier_testbed.topology import parse_topology
    backing = tmp_path / "cxl.raw"
    backing.write_bytes(chaos.SUPERBLOCK_MAGIC + bytes(16 * MiB - 8))
    topo = parse_topology({"name": "chaostest", "backend": "native",
                           "host": [{"name": "host0", "role": "compute"}, {"name": "host1", "role": "compute"}],
                           "cxl": [{"name": "cxl0", "size": "256M", "hosts": ["host0", "host1"],
                                    "backing": str(backing)}],
                           "link": [{"name": "data0", "subnet": "10.79.0.0/24", "hosts": ["host0", "host1"]}]})
    monkeypatch.setenv("SNAPTIER_STATE", str(tmp_path / "state"))
    store = FakeCxlStore(backing)
    rc = chaos.run_chaos(topo, ["corrupt-cxl"], run=store, ensure_agents=lambda t: None)
    report = json.loads((tmp_path / "state" / "chaostest" / "chaos.json").read_text())
    checks = {c["check"].split(": ", 1)[1]: c for c in report["rows"][0]["checks"]}
    assert rc == 0, [c["detail"] for c in checks.values() if not c["ok"]]
    assert "8 pages of" in checks["flip one byte per CXL page"]["detail"]
    readers = [p["name"] for p in FakeCxlStore.POLICIES if p["placement"] != "rdma"]
    for policy in readers:
        assert checks[f"{policy} answers corrupt"]["ok"], policy
    assert "lazy-rdma answers corrupt" not in checks, "a policy reading only the RDMA pool reads no CXL page"
    assert checks["criu-remote answers corrupt"]["host"] == "host1"
    assert checks["restores again after re-snapshot"]["ok"]


def test_corrupt_cxl_fails_a_policy_that_serves_the_damaged_copy(tmp_path, monkeypatch):
    from snaptier_testbed.topology import parse_topology

    class Unchecked(FakeCxlStore):
        def _check(self, cid):   # tiered and aquifer never look at the bytes
            return None if ":cxl" not in cid else super()._check(cid)
    backing = tmp_path / "cxl.raw"
    backing.write_bytes(chaos.SUPERBLOCK_MAGIC + bytes(16 * MiB - 8))
    topo = parse_topology({"name": "chaostest", "backend": "native",
                           "host": [{"name": "host0", "role": "compute"}, {"name": "host1", "role": "compute"}],
                           "cxl": [{"name": "cxl0", "size": "256M", "hosts": ["host0", "host1"],
                                    "backing": str(backing)}],
                           "link": [{"name": "data0", "subnet": "10.79.0.0/24", "hosts": ["host0", "host1"]}]})
    monkeypatch.setenv("SNAPTIER_STATE", str(tmp_path / "state"))
    rc = chaos.run_chaos(topo, ["corrupt-cxl"], run=Unchecked(backing), ensure_agents=lambda t: None)
    report = json.loads((tmp_path / "state" / "chaostest" / "chaos.json").read_text())
    failed = {c["check"] for c in report["rows"][0]["checks"] if not c["ok"]}
    assert rc == 1
    assert failed == {"corrupt-cxl: aquifer answers corrupt", "corrupt-cxl: tiered answers corrupt"}
