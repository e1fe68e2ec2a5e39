"""End-to-end scenarios on a running topology. Each step is a real command in a guest; the
result is a table and a closing 'N passed, N failed' line.

restore-everywhere: one snapshot restored on every host sharing its CXL device at once.

agent-smoke: tier agents on every host; host0 publishes a snapshot whose pages lie in CXL,
host1 lists it and reads it back byte-exact straight from the shared region (no copy); host1
places a snapshot in the RDMA pool, host0 reads it back; the agent on host1 is killed (SIGKILL)
and restarted and still sees every published snapshot; the agent's unit tests run in a guest (RDMA
against rxe); a real function is dumped with CRIU and restored with snaptier's lazy-pages server.
"""
from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from . import agents, tierctl
from .launcher import TestbedError, run_in, say
from .report import Check, print_checks, skipped
from .state import state_dir_for
from .topology import Topology

BIN = agents.GUEST_BUILD
TESTS = "/opt/snaptier/build/guest/tests/agent"


class Steps:
    """Scenario steps as health-style checks, each announced as it finishes."""

    def __init__(self) -> None:
        self.rows: list[Check] = []

    def record(self, name: str, host: str, ok: bool, detail: str) -> bool:
        self.rows.append(Check(name, host, ok, detail))
        say(f"{'ok  ' if ok else 'FAIL'} {name} [{host}] {detail}")
        return ok

    def skip(self, name: str, host: str, reason: str) -> None:
        self.rows.append(skipped(name, host, reason))
        say(f"skip {name} [{host}] {reason}")

    def report(self, title: str) -> int:
        return print_checks(title, self.rows, "scenario")


def tierctl_json(topo: Topology, host: str, args: str, timeout: int = 120) -> tuple[int, dict, str]:
    """tierctl.tierctl with an empty object for "no answer", as the checks below read it."""
    rc, doc, err = tierctl.tierctl(run_in, topo, host, args, timeout)
    return rc, doc or {}, err


def make_data(topo: Topology, host: str, path: str, seed: int, pages: int) -> tuple[str, int]:
    """Random pages with every fourth page zero; returns (sha256, zero page count)."""
    r = run_in(topo, host, f"""python3 - <<'PY'
import hashlib, random
rng = random.Random({seed}); zero = bytes(4096); out = bytearray(); zeros = 0
for i in range({pages}):
    if i % 4 == 3: out += zero; zeros += 1
    else: out += rng.randbytes(4096)
open("{path}", "wb").write(out)
print(hashlib.sha256(out).hexdigest(), zeros)
PY""")
    if r.returncode != 0:
        raise TestbedError(f"{host}: could not create test data: {r.stderr.strip()}")
    digest, zeros = r.stdout.split()
    return digest, int(zeros)


def agent_smoke(topo: Topology) -> int:
    cxl = next((c for c in topo.cxl if len(c.hosts) >= 2), None)
    if cxl is None:
        raise TestbedError("agent-smoke needs two hosts sharing a CXL device")
    has_pool = any(h.role == "memory" for h in topo.hosts)
    no_pool = "no memory node in this topology: no RDMA pool"
    writer, reader = cxl.hosts[0], cxl.hosts[1]
    steps = Steps()
    t0 = time.monotonic()
    # A reused topology may run agents from an older build: always test the current one.
    agents.stop(topo)
    agents.start(topo)
    run = secrets.token_hex(3)
    pages = 1024  # 4 MiB: a few seconds through the emulated CXL MMIO path

    # 1. host0 publishes a snapshot whose pages are in CXL.
    cxl_id = f"smoke-cxl-{run}"
    digest, zeros = make_data(topo, writer, "/tmp/smoke-cxl.bin", 1, pages)
    rc, put, err = tierctl_json(topo, writer, f"put {cxl_id} /tmp/smoke-cxl.bin --tier cxl")
    stored = (put.get("bytes_per_tier") or {}).get("cxl", -1)
    steps.record("publish snapshot in CXL", writer,
                 rc == 0 and put.get("published") is True and put.get("zero_pages") == zeros
                 and stored == (pages - zeros) * 4096,
                 f"{cxl_id}: {pages} pages, {put.get('zero_pages')} zero pages not stored, {stored} bytes in cxl"
                 if rc == 0 else err)

    # 2. host1 finds it and reads it from the shared region, in place.
    rc, listing, err = tierctl_json(topo, reader, "list")
    ids = [s.get("id") for s in listing.get("snapshots", [])]
    steps.record("list shows the published snapshot", reader, rc == 0 and cxl_id in ids,
                 f"{len(ids)} snapshots listed" if rc == 0 else err)
    rc, got, err = tierctl_json(topo, reader, f"read {cxl_id} /tmp/smoke-cxl.out")
    steps.record("read back byte-exact from CXL, no copy", reader,
                 rc == 0 and got.get("sha256") == digest and got.get("copied_pages") == 0
                 and got.get("mapped_pages") == pages - zeros,
                 f"sha256 {'matches' if got.get('sha256') == digest else 'DIFFERS'}; "
                 f"{got.get('mapped_pages')} pages read in place, {got.get('copied_pages')} copied" if rc == 0 else err)

    # 3. host1 places a snapshot in the RDMA pool; host0 reads it back.
    rdma_id = f"smoke-rdma-{run}" if has_pool else None
    if rdma_id:
        rdigest, rzeros = make_data(topo, reader, "/tmp/smoke-rdma.bin", 2, 256)
        rc, put, err = tierctl_json(topo, reader, f"put {rdma_id} /tmp/smoke-rdma.bin --tier rdma")
        stored = (put.get("bytes_per_tier") or {}).get("rdma", -1)
        steps.record("place snapshot in the RDMA pool", reader,
                     rc == 0 and stored == (256 - rzeros) * 4096 and put.get("published") is True,
                     f"{rdma_id}: {stored} bytes in the pool of the memory node" if rc == 0 else err)
        rc, got, err = tierctl_json(topo, writer, f"read {rdma_id} /tmp/smoke-rdma.out")
        steps.record("read back byte-exact over RDMA", writer, rc == 0 and got.get("sha256") == rdigest,
                     f"sha256 {'matches' if got.get('sha256') == rdigest else 'DIFFERS'}; "
                     f"{got.get('copied_pages')} pages fetched by one-sided READ" if rc == 0 else err)
    else:
        steps.skip("place snapshot in the RDMA pool", reader, no_pool)
        steps.skip("read back byte-exact over RDMA", writer, no_pool)

    # 4. Kill host1's agent outright and restart it: nothing published is lost.
    run_in(topo, reader, "kill -9 $(cat /run/snaptier/agent.pid)")
    agents.start(topo)
    rc, listing, err = tierctl_json(topo, reader, "list")
    ids = [s.get("id") for s in listing.get("snapshots", [])]
    rc2, got, err2 = tierctl_json(topo, reader, f"read {cxl_id} /tmp/smoke-cxl.out2")
    steps.record("SIGKILL + restart loses nothing", reader,
                 rc == 0 and cxl_id in ids and (rdma_id is None or rdma_id in ids) and rc2 == 0
                 and got.get("sha256") == digest,
                 f"{'both snapshots' if rdma_id else cxl_id} listed and {cxl_id} reads back byte-exact"
                 if rc == 0 and rc2 == 0 else err + err2)

    # 5. The agent's unit tests as built for trixie, in the guest: RDMA tests run against rxe0.
    r = run_in(topo, writer, f"""cd /tmp && rm -f /tmp/gtest-*.json
for t in {TESTS}/*_test; do
  timeout 300 $t --gtest_brief=1 --gtest_output=json:/tmp/gtest-$(basename $t).json > /dev/null 2>&1
done
python3 - <<'PY'
import glob, json
tests = failed = skipped = 0; rdma_ran = 0; bad = []
for f in glob.glob("/tmp/gtest-*.json"):
    for suite in json.load(open(f))["testsuites"]:
        for t in suite["testsuite"]:
            tests += 1
            name = suite["name"] + "." + t["name"]
            if t.get("failures"): failed += 1; bad.append(name)
            elif t.get("result") == "SKIPPED": skipped += 1
            elif suite["name"].startswith("RdmaTier"): rdma_ran += 1
print(json.dumps(dict(tests=tests, failed=failed, skipped=skipped, rdma_ran=rdma_ran, bad=bad)))
PY""", timeout=900)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {}
    steps.record("agent unit tests in the guest (trixie build)", writer,
                 r.returncode == 0 and res.get("tests", 0) > 0 and res.get("failed") == 0
                 and (res.get("rdma_ran", 0) > 0 or not has_pool),
                 f"{res.get('tests')} tests: {res.get('failed')} failed, {res.get('skipped')} skipped "
                 f"(no-device cases), {res.get('rdma_ran')} RDMA tier tests on rxe0"
                 + (f"; failed: {', '.join(res.get('bad', []))}" if res.get("bad") else "") if res else r.stderr[-300:])

    # 6. A real function snapshotted with CRIU and restored with snaptier's lazy-pages server
    #    (demand faults, and everything installed before resume), against criu's own daemon.
    r = run_in(topo, writer, "bash /opt/snaptier/workloads/tests/lazy-restore.sh helloworld json_serdes", timeout=600)
    closing = next((l for l in reversed(r.stdout.splitlines()) if " passed, " in l), "no summary")
    rows = [l.split() for l in r.stdout.splitlines() if l.startswith(("helloworld", "json_serdes"))]
    faults = ", ".join(f"{row[0]} {row[1]}: {row[4]} faults" for row in rows if row[1] in ("none", "all"))
    steps.record("CRIU dump + lazy restore served by snaptier", writer,
                 r.returncode == 0 and closing.strip().endswith(" 0 failed"),
                 f"{closing.strip()}; {faults}" if rows else (r.stderr.strip() or r.stdout.strip())[-300:])

    # Clean up: each owner deletes its own snapshot.
    for host, sid in ((writer, cxl_id), (reader, rdma_id)):
        if sid is None:
            continue
        rc, _, err = tierctl_json(topo, host, f"delete {sid}")
        steps.record("owner deletes its snapshot", host, rc == 0, sid if rc == 0 else err)

    (state_dir_for(topo.name) / "scenario-agent-smoke.json").write_text(json.dumps(
        [asdict(r) for r in steps.rows], indent=1) + "\n")
    return steps.report(f"scenario agent-smoke on topology {topo.name} ({time.monotonic() - t0:.0f} s)")


def restore_everywhere(topo: Topology, function: str = "helloworld", policy: str = "reap") -> int:
    """One snapshot, taken on the first host of a shared CXL device, restored on every attached
    host at once (each host's agent restores from the one copy in the device): answer and
    state digest checked per host."""
    cxl = next((c for c in topo.cxl if len(c.hosts) >= 2), None)
    if cxl is None:
        raise TestbedError("restore-everywhere needs hosts sharing a CXL device")
    steps = Steps()
    t0 = time.monotonic()
    agents.start(topo)
    origin = cxl.hosts[0]
    sid = f"everywhere-{function}-{secrets.token_hex(3)}"
    rc, snap, err = tierctl_json(topo, origin, f"snapshot {function} --id {sid}", timeout=900)
    steps.record(f"snapshot {function}", origin, rc == 0 and bool(snap.get("id")),
                 f"{snap.get('id')}: {snap.get('pages')} pages" if rc == 0 else err)
    if rc == 0:
        def restore_on(host: str) -> tuple[str, int, dict, str]:
            return (host, *tierctl_json(topo, host, f"restore {snap['id']} --policy {policy}", timeout=600))
        with ThreadPoolExecutor(max_workers=len(cxl.hosts)) as pool:
            outcomes = list(pool.map(restore_on, cxl.hosts))
        for host, rc, doc, err in outcomes:
            ok = rc == 0 and doc.get("ok") is True and doc.get("answer_ok") is True and doc.get("digest_ok") is True
            faults = (doc.get("faults") or {}).get("total")
            steps.record(f"restore {policy}", host, ok,
                         f"first response {doc.get('first_response_ms', 0):.1f} ms, {faults} faults, "
                         f"{doc.get('pages_mapped_in_place', 0)} pages used in place, "
                         f"{(doc.get('local_anonymous_bytes') or 0) / 2**20:.1f} MiB local anonymous, "
                         f"answer {'right' if doc.get('answer_ok') else 'WRONG'}, digest "
                         f"{'equal' if doc.get('digest_ok') else 'DIFFERS'}" if rc == 0 else err)
        for v in dict.fromkeys([x.get("id") for x in snap.get("variants") or [] if isinstance(x, dict)] + [snap["id"]]):
            if v:
                tierctl_json(topo, origin, f"delete {v}")
    (state_dir_for(topo.name) / "scenario-restore-everywhere.json").write_text(json.dumps(
        [asdict(r) for r in steps.rows], indent=1) + "\n")
    return steps.report(f"scenario restore-everywhere on topology {topo.name}: {function} from {origin} on "
                        f"{len(cxl.hosts)} hosts with {policy} ({time.monotonic() - t0:.0f} s)")


SCENARIOS = {"agent-smoke": agent_smoke, "restore-everywhere": restore_everywhere}
