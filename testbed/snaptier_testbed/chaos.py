"""tb chaos: fault injection on a running topology, one promise per row.

Each row breaks one thing on purpose, checks what the agents promise about it, and leaves the
testbed healthy again (its last check says so; it restarts what it stopped and deletes what it
made, on failure too):

  corrupt-cxl             one byte flipped in every page of a snapshot's CXL copies, from this
                          machine's side (the shared backing file): every policy that reads
                          them answers `corrupt` naming snapshot, page and tier; nothing runs on
                          a damaged page; a fresh snapshot under the same id restores again
  kill-agent-mid-restore  the restoring host's agent SIGKILLed during a restore (criu restore /
                          criu lazy-pages running): after the restart nothing of it is left
                          (stopped tasks, criu, instances) and the next restore succeeds
  fill-cxl, fill-file,    snapshots put until the tier is full: a clear `no_space`, nothing half
  fill-rdma               published, and the space usable again after deleting
  concurrent-publish      one id published from two hosts at once: one winner that every host
                          agrees on, a clear `already_exists` for the loser, its space given back
  memnode-stall           (emulated, needs the memory node) its QEMU SIGSTOPped for 5 s in the
                          middle of an RDMA restore: that restore ends (ok or a clean error) and
                          the next one succeeds without restarting anything
  memnode-agent-restart   (needs the memory node) its agent restarted: snapshots with pages in
                          the RDMA pool still restore byte-exact

Prints a table like `tb health`, writes run/<topology>/chaos.json (after every row); exit 0 iff
no check failed. Reference: docs/testbed.md ("Fault injection").
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import agents, launcher, matrix, tierctl
from .launcher import TestbedError, say
from .machine import Runtime, cxl_backing
from .report import Check, print_checks, skipped
from .state import REPO, state_dir_for
from .topology import MiB, Topology

ROWS = ("corrupt-cxl", "kill-agent-mid-restore", "kill-burst-instance", "fill-cxl", "fill-file", "fill-rdma",
        "concurrent-publish", "memnode-stall", "memnode-agent-restart", "memnode-late")
BURST_INSTANCES = 4
BURST_POLICY = "lazy-cxl"  # demand faults: the restored tasks live long enough to be found and killed
# Placements with pages in CXL: a policy reading one of them reads damaged CXL pages.
CXL_PLACEMENTS = ("cxl", "tiered")
PROBE = "python3 /opt/snaptier/testbed/guest/chaosprobe.py"
SUPERBLOCK_MAGIC = b"SNAPCXL1"
FLIP_AT = 777            # byte of each page that corrupt-cxl flips
FILL_CHUNK = 64 * MiB    # one put of fill-*
STALL_S = 5.0
KILL_ATTEMPTS = 10
SNAPSHOT_TIMEOUT_S = matrix.SNAPSHOT_TIMEOUT_S
RESTORE_TIMEOUT_S = matrix.RESTORE_TIMEOUT_S


class UsageError(TestbedError):
    """Bad arguments (exit 2), before any host is contacted."""


def parse_rows(text: str | None) -> list[str]:
    """--only ROW,...: known rows in the order given, duplicates dropped; every row if None."""
    if text is None:
        return list(ROWS)
    rows = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [r for r in rows if r not in ROWS]
    if not rows or unknown:
        raise UsageError(f"--only: {'unknown row ' + ', '.join(map(repr, unknown)) if unknown else 'empty list'}; "
                         f"rows: {', '.join(ROWS)}")
    return rows


# ------------------------------------------------------------------ pure helpers (unit-tested)
def error_of(rc: int, doc: dict | None, err: str) -> tuple[str | None, str]:
    """(code, message) of a failed tierctl call or of a restore that ran and failed; (None, "")
    when it succeeded. Codes are the agent's (`corrupt`, `no_space`, ...), or `transport`."""
    if isinstance(doc, dict):
        e = doc.get("error")
        if isinstance(e, dict):                       # an error reply
            return str(e.get("code")), str(e.get("message", ""))
        if rc == 0 and doc.get("ok") is False:        # a restore result: "code: message"
            text = str(e or "; ".join(map(str, doc.get("problems") or [])) or "restore failed")
            server = (doc.get("server") or {}).get("error")
            if server and server not in text:
                text += f" (lazy-pages server: {server})"
            m = re.match(r"([a-z_]+): ", text)
            return (m.group(1) if m else "failed"), text
        if rc == 0:
            return None, ""
    return ("transport" if rc in (3, 124, 255) else "failed"), err


CORRUPT_PAGE = re.compile(r"snapshot '([^']+)': page (\d+) \(vaddr 0x[0-9a-f]+\) on tier (\w+)")


def judge_corrupt(rc: int, doc: dict | None, err: str, ids: set[str]) -> tuple[bool, str]:
    """A restore or read of a damaged copy must refuse it as `corrupt`, naming one of `ids`,
    the page and the tier `cxl`; anything else (success, a crashed function, another error) fails."""
    code, message = error_of(rc, doc, err)
    if code is None:
        answered = "right" if (doc or {}).get("answer_ok") else "WRONG" if (doc or {}).get("answer_ok") is False else "-"
        return False, f"served the damaged copy: ok, answer {answered} (a damaged page reached a process unchecked)"
    server = (doc.get("server") or {}).get("error") if isinstance(doc, dict) else None
    text = f"{code}: {message} {server or ''}"
    m = CORRUPT_PAGE.search(text)
    if "corrupt" not in text or not m:
        return False, f"failed, but not as corrupt naming snapshot, page and tier: {code}: {message[:240]}"
    if m.group(1) not in ids or m.group(3) != "cxl":
        return False, f"corrupt, but names snapshot {m.group(1)!r} tier {m.group(3)}: {message[:200]}"
    return True, f"corrupt: snapshot {m.group(1)!r} page {m.group(2)} on tier cxl"


def region_base(backing: Path, search: int = 64 * MiB, step: int = 2 * MiB) -> int:
    """Offset of the agent's CXL region inside the backing file as this machine sees it: where
    its superblock is (0 for a whole-file region; a devdax namespace may keep an info block in
    front). Raises TestbedError if there is none."""
    with open(backing, "rb") as f:
        for base in range(0, search, step):
            f.seek(base)
            if f.read(len(SUPERBLOCK_MAGIC)) == SUPERBLOCK_MAGIC:
                return base
    raise TestbedError(f"{backing}: no CXL directory superblock in its first {search // MiB} MiB "
                       "(is the agent's CXL tier up?)")


def cxl_pages(extents: list[dict]) -> list[int]:
    """Region offsets of every page stored on tier cxl in `extents` (tierctl info)."""
    out = []
    for e in extents:
        if e.get("tier") == "cxl":
            out += [int(e["offset"]) + i * 4096 for i in range(int(e["pages"]))]
    return out


def flip_bytes(backing: Path, base: int, page_offsets: list[int], at: int = FLIP_AT) -> int:
    """XORs one byte of each page with 0xff in the backing file (a stray write from outside the
    agents). Returns the count of pages changed; flipping again restores them."""
    with open(backing, "r+b", buffering=0) as f:
        for off in page_offsets:
            f.seek(base + off + at)
            b = f.read(1)
            f.seek(base + off + at)
            f.write(bytes([b[0] ^ 0xFF]))
        os.fsync(f.fileno())
    return len(page_offsets)


# ------------------------------------------------------------------ running
@dataclass
class Row:
    name: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, what: str, host: str, ok: bool, detail: str, values: dict | None = None) -> bool:
        c = Check(f"{self.name}: {what}", host, ok, detail, values or {})
        self.checks.append(c)
        say(f"{'ok  ' if ok else 'FAIL'} {c.check} [{host}] {detail}")
        return ok

    def skip(self, what: str, host: str, reason: str) -> None:
        self.checks.append(skipped(f"{self.name}: {what}", host, reason))
        say(f"skip {self.name}: {what} [{host}] {reason}")


class Chaos:
    def __init__(self, topo: Topology, function: str, run=None):
        self.topo = topo
        self.function = function
        self.run = run or launcher.run_in
        self.tag = secrets.token_hex(3)
        self.state_dir = state_dir_for(topo.name)
        self.cxl = next((c for c in topo.cxl if len(c.hosts) >= 1), None)
        compute = [h.name for h in topo.hosts if h.role == "compute"]
        self.compute = compute
        self.memnode = next((h.name for h in topo.hosts if h.role == "memory"), None)
        self.snap_host = self.cxl.hosts[0] if self.cxl else (compute[0] if compute else None)
        self.peer = next((h for h in (self.cxl.hosts if self.cxl else compute) if h != self.snap_host), None)
        self.made: dict[str, set[str]] = {}   # host -> ids this run created there (deleted at the end)

    # -- tierctl
    def tierctl(self, host: str, args: str, timeout_s: int = 120):
        return tierctl.tierctl(self.run, self.topo, host, args, timeout_s)

    def cxl_readers(self, host: str) -> list[dict]:
        """The policies `host`'s agent lists whose restore reads a copy with pages in CXL, in its order."""
        return [p for p in matrix.agent_policies(self.run, self.topo, host) if p.get("placement") in CXL_PLACEMENTS]

    def lacks(self, host: str, policy: str, doc) -> str | None:
        """What `host`'s agent says it lacks for `policy` (its status' policies[].missing), asked
        only about a restore that did not run; None if it cannot say."""
        if not matrix.refused_or_failed(doc):
            return None
        try:
            listed = matrix.agent_policies(self.run, self.topo, host)
        except TestbedError:
            return None
        return next((p.get("missing") for p in listed if p["name"] == policy), None)

    def sh(self, host: str, script: str, timeout: float = 120):
        return self.run(self.topo, host, script, timeout=timeout)

    def probe_json(self, host: str, args: str, timeout: float = 120):
        r = self.sh(host, f"{PROBE} {args}", timeout=timeout)
        doc = tierctl.parse_json_output(r.stdout or "")
        if doc is None:
            try:
                doc = json.loads((r.stdout or "").strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise TestbedError(f"{host}: chaosprobe {args.split()[0]} failed: {(r.stderr or r.stdout)[-300:]}")
        return doc

    def strays(self, host: str) -> list[dict]:
        return self.probe_json(host, f"strays {agents.FUNCTIONS_WORK_DIR}", timeout=60)

    def backing(self) -> Path:
        runtime = Runtime(repo=REPO, state_dir=self.state_dir, image_dir=Path("."), accel=self.topo.backend)
        return cxl_backing(self.topo, self.cxl.name, runtime)

    def snapshot(self, host: str, sid: str) -> tuple[dict | None, str]:
        rc, doc, err = self.tierctl(host, f"snapshot {shlex.quote(self.function)} --id {shlex.quote(sid)}",
                                    SNAPSHOT_TIMEOUT_S)
        if rc != 0 or not doc:
            return None, err
        ids = [v["id"] for v in doc.get("variants") or [] if isinstance(v, dict) and v.get("id")]
        self.made.setdefault(host, set()).update(ids + [doc.get("id") or sid])
        return doc, ""

    def row_snapshot(self, row: Row, prefix: str, what: str) -> tuple[str, dict] | None:
        """The row's own snapshot of the function on the snapshot host, recorded as its first
        check: (id, tierctl's result), or None when the row stops there (no compute host: `what`
        is skipped; or the snapshot failed)."""
        if self.snap_host is None:
            row.skip(what, "-", "no compute host")
            return None
        sid = f"chaos-{prefix}-{self.tag}"
        snap, err = self.snapshot(self.snap_host, sid)
        if not row.add(f"snapshot {self.function}", self.snap_host, snap is not None, sid if snap else err):
            return None
        return sid, snap

    def restore(self, host: str, sid: str, policy: str, on: str | None = None):
        forward = f" --host {shlex.quote(on)}" if on and on != host else ""
        return self.tierctl(host, f"restore {shlex.quote(sid)} --policy {shlex.quote(policy)}{forward}",
                            RESTORE_TIMEOUT_S)

    def delete_made(self) -> list[str]:
        problems = []
        for host, ids in self.made.items():
            # Variants (ID:cxl, ID:rdma) before the id itself, as tb matrix does.
            for sid in sorted(ids, key=lambda i: (":" not in i, i)):
                rc, doc, err = self.tierctl(host, f"delete {shlex.quote(sid)}", 120)
                code, message = error_of(rc, doc, err)
                if code not in (None, "not_found"):
                    problems.append(f"{sid} on {host}: {code}: {message[:120]}")
            ids.clear()
        return problems

    def ensure_agents(self) -> None:
        agents.start(self.topo)

    def healthy(self, row: Row) -> None:
        """The row's last check: every agent answers, no stray process, nothing of the run left."""
        problems = []
        try:
            self.ensure_agents()
        except TestbedError as e:
            problems.append(f"agents: {e}")
        problems += self.delete_made()
        for h in self.compute:
            try:
                left = self.strays(h)
            except TestbedError as e:
                problems.append(str(e))
                continue
            if left:
                problems.append(f"{h}: " + "; ".join(f"pid {p['pid']} {p['comm']} ({', '.join(p['why'])})" for p in left[:4]))
        for h in [x.name for x in self.topo.hosts]:
            rc, _, err = self.tierctl(h, "ping", 30)
            if rc != 0:
                problems.append(f"{h}: agent does not answer: {err}")
        if self.memnode and self.topo.guests:
            pid = self.memnode_pid()
            if pid and _state(pid) in ("T", "t"):
                os.kill(pid, signal.SIGCONT)
                problems.append(f"{self.memnode}'s QEMU was still stopped (continued it)")
        row.add("testbed healthy afterwards", "-", not problems,
                "; ".join(problems)[:400] if problems else "every agent answers, no stray process, nothing left")

    def memnode_pid(self) -> int | None:
        return launcher.running_hosts(self.topo, self.state_dir).get(self.memnode) if self.memnode else None


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2]
    except OSError:
        return ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ rows
def row_corrupt_cxl(c: Chaos, row: Row) -> None:
    if c.cxl is None:
        row.skip("every CXL reader answers corrupt", "-", "no CXL device in this topology")
        return
    host, sid = c.snap_host, f"chaos-corrupt-{c.tag}"
    snap, err = c.snapshot(host, sid)
    if not row.add(f"snapshot {c.function}", host, snap is not None,
                   f"{sid}: {snap.get('pages')} pages, variants "
                   f"{', '.join(v['id'] for v in snap.get('variants') or [])}" if snap else err):
        return
    # Every copy with pages in CXL, and where those pages are.
    damaged: dict[str, list[int]] = {}
    for v in snap.get("variants") or []:
        rc, info, err = c.tierctl(host, f"info {shlex.quote(v['id'])}")
        if rc != 0 or not info or "extents" not in info:
            row.add("locate the CXL copies", host, False,
                    f"info {v['id']}: {err or 'no extents in the reply: this agent predates snapshot.info extents'}")
            return
        pages = cxl_pages(info["extents"])
        if pages:
            damaged[v["id"]] = pages
    backing = c.backing()
    base = region_base(backing)
    flipped = sum(flip_bytes(backing, base, pages) for pages in damaged.values())
    row.add("flip one byte per CXL page", "-", flipped > 0,
            f"{flipped} pages of {', '.join(damaged)} in {backing} (region at +{base}), byte {FLIP_AT} of each")
    if not flipped:
        return
    ids = set(damaged) | {sid}
    copy = f"{sid}:cxl" if f"{sid}:cxl" in damaged else next(iter(damaged))
    rc, doc, err = c.tierctl(host, f"read {shlex.quote(copy)} /tmp/chaos-corrupt.out", 300)
    ok, detail = judge_corrupt(rc, doc, err, ids)
    row.add(f"tierctl read {copy} answers corrupt", host, ok, detail)
    try:
        readers = c.cxl_readers(host)
    except TestbedError as e:
        row.add("list the policies that read CXL", host, False, str(e))
        return
    for reader in readers:
        policy = reader["name"]
        on = c.peer if policy == "criu-remote" else host
        if on is None:
            row.skip(f"{policy} answers corrupt", host, "criu-remote needs a second host sharing the CXL device")
            continue
        rc, doc, err = c.restore(host, sid, policy, on)
        # A policy that must map in place is refused, not failed, by a host that cannot map.
        needs_mapping = bool(reader.get("in_place_required"))
        skip = matrix.skip_reason(c.topo, doc, c.lacks(on, policy, doc)) if needs_mapping else None
        if skip:
            row.skip(f"{policy} answers corrupt", on, skip)
            continue
        ok, detail = judge_corrupt(rc, doc, err, ids)
        left = c.strays(on)
        if left:
            ok = False
            detail += f"; left behind: {', '.join(p['comm'] + ' ' + '/'.join(p['why']) for p in left[:3])}"
        row.add(f"{policy} answers corrupt", on, ok, detail)
    # The same id again from a fresh snapshot: restorable with every one of those policies.
    problems = c.delete_made()
    snap, err = c.snapshot(host, sid)
    if not row.add("re-snapshot under the same id", host, snap is not None and not problems,
                   "; ".join(problems) or (f"{sid}: {snap.get('pages')} pages" if snap else err)):
        return
    failed = []
    for reader in readers:
        policy = reader["name"]
        on = c.peer if policy == "criu-remote" else host
        if on is None:
            continue
        rc, doc, err = c.restore(host, sid, policy, on)
        if reader.get("in_place_required") and matrix.skip_reason(c.topo, doc, c.lacks(on, policy, doc)):
            continue
        code, message = error_of(rc, doc, err)
        if code is not None or not (doc or {}).get("digest_ok"):
            failed.append(f"{policy}: {code}: {message[:160]}")
    row.add("restores again after re-snapshot", host, not failed,
            "; ".join(failed) if failed else "every policy above: answer right, digest equal")


KILL_POINTS = (
    # (policy, what must be running when the agent dies, regex over the host's command lines or
    # "@stopped": a restored task left stopped, its before-resume pages not yet installed)
    # The agent sends its restores to a `criu swrk` worker (prestart_criu, the default), whose
    # title reads "criu: restore --rpc ..." once the request is in; else it runs `criu restore`.
    ("lazy-cxl", "criu restore (agent's lazy-pages server)", r"criu restore .*--lazy-pages|criu: restore --rpc"),
    ("reap", "the prefetch (restored tasks stopped)", "@stopped"),
    ("criu-lazy", "criu lazy-pages daemon", r"criu lazy-pages "),
    ("criu-eager", "criu restore", r"criu restore |criu: restore --rpc"),
)


def row_kill_agent(c: Chaos, row: Row) -> None:
    made = c.row_snapshot(row, "kill", "kill the agent mid-restore")
    if made is None:
        return
    sid, snap = made
    # The restoring host: the second host of the CXL device when the `cxl` copy is published
    # (it can restore it), else the snapshot host.
    cxl_copy = next((v for v in snap.get("variants") or [] if v.get("id") == f"{sid}:cxl"), {})
    host = c.peer if c.peer and cxl_copy.get("published") else c.snap_host
    for policy, what, pattern in KILL_POINTS:
        tierctl = (f"{agents.GUEST_BUILD}/tierctl --socket {agents.AGENT_SOCKET} --timeout-ms {RESTORE_TIMEOUT_S * 1000} "
                   f"--json restore {shlex.quote(sid)} --policy {policy}")
        # The moment can be a few milliseconds long natively: try a few restores to meet it.
        for attempt in range(1, KILL_ATTEMPTS + 1):
            doc = c.probe_json(host, f"kill-agent-during {shlex.quote(pattern)} /run/snaptier/agent.pid "
                                     f"{RESTORE_TIMEOUT_S} -- {tierctl}", timeout=RESTORE_TIMEOUT_S + 60)
            if doc.get("triggered"):
                break
        if not doc.get("triggered"):
            row.add(f"{policy}: agent killed during {what}", host, False,
                    f"{KILL_ATTEMPTS} restores ended (last: tierctl exit {doc.get('rc')}) before {what} was seen: "
                    "nothing was killed")
            continue
        at_kill = [p for p in doc.get("at_kill") or [] if p["pid"] != doc.get("agent_pid")]
        stopped = [p for p in at_kill if p["state"] == "T" and p["comm"] != "criu"]
        row.add(f"{policy}: agent killed during {what}", host, True,
                f"after {doc['after_ms']:.0f} ms (attempt {attempt}): {len(stopped)} stopped tasks, "
                f"{sum(p['comm'] == 'criu' for p in at_kill)} criu running; tierctl exit {doc.get('rc')}")
        time.sleep(0.5)   # what the dead agent's children do next (criu fails or finishes)
        before = c.strays(host)
        c.ensure_agents()  # how the testbed restarts agents (only those not running)
        after = c.strays(host)
        r = c.sh(host, f"ls {agents.FUNCTIONS_WORK_DIR}/restores 2>/dev/null | wc -l", 30)
        left_dirs = int((r.stdout or "0").strip() or 0)
        row.add(f"{policy}: nothing left after the restart", host, not after and left_dirs == 0,
                (f"before the restart {len(before)} left ("
                 + ", ".join(sorted({p['comm'] + ': ' + '+'.join(p['why']) for p in before}))[:160]
                 + "), after it none and no restore folder" if before else
                 "nothing was left even before the restart (criu ended the restore itself)")
                if not after and left_dirs == 0 else
                f"after the restart: {len(after)} stray processes: "
                + "; ".join(f"pid {p['pid']} {p['comm']} {p['state']} ({', '.join(p['why'])})" for p in after[:4])
                + f"; restore folders left: {left_dirs}")
        rc, res, err = c.restore(host, sid, policy)
        code, message = error_of(rc, res, err)
        row.add(f"{policy}: next restore succeeds", host, code is None and bool((res or {}).get("digest_ok")),
                f"first response {res.get('first_response_ms', 0):.0f} ms, answer right, digest equal"
                if code is None and res else f"{code}: {message[:200]}")


def row_kill_burst_instance(c: Chaos, row: Row) -> None:
    """A burst of instances of one snapshot; one restored task is SIGKILLed while the burst runs:
    that instance fails, every other one answers right with an equal digest."""
    made = c.row_snapshot(row, "burst", "kill one instance of a burst")
    if made is None:
        return
    sid, snap = made
    host = c.snap_host
    # The restore's work directory names its criu worker from when it is prestarted, then the
    # restored root once the tree exists (criu restore's --pidfile, or the agent as the root's
    # restorer announces itself), until the instance ends.
    pid_files = f"{agents.FUNCTIONS_WORK_DIR}/restores/{sid}.{BURST_POLICY}.*/pid"
    timeout_s = RESTORE_TIMEOUT_S + 60 * BURST_INSTANCES
    tierctl = (f"{agents.GUEST_BUILD}/tierctl --socket {agents.AGENT_SOCKET} --timeout-ms {timeout_s * 1000} --json "
               f"restore {shlex.quote(sid)} --policy {BURST_POLICY} --instances {BURST_INSTANCES}")
    # The victim: the first process a restore of the burst names (its criu worker, or the tree
    # once the root is known), and what it was.
    script = f"""set -u
out=$(mktemp); {tierctl} > "$out" 2>&1 & burst=$!
victim=
for i in $(seq 1 20000); do
  for f in {pid_files}; do [ -s "$f" ] && victim=$(cat "$f") && break; done
  [ -n "$victim" ] && break
  kill -0 $burst 2>/dev/null || break
  sleep 0.005
done
what=$(cat /proc/$victim/comm 2>/dev/null || true)
[ -n "$victim" ] && kill -KILL "$victim"
wait $burst; echo "victim=${{victim:-none}} ${{what}}"; cat "$out"; rm -f "$out"
"""
    # A kill that lands after its instance answered (the restores take milliseconds natively)
    # fails nothing: the burst is run again, up to three times.
    attempts = 0
    while True:
        attempts += 1
        r = c.sh(host, script, timeout=timeout_s + 60)
        lines = (r.stdout or "").splitlines()
        victim = next((line.split("=", 1)[1].strip() for line in lines if line.startswith("victim=")), "none")
        text = "\n".join(line for line in lines if not line.startswith("victim="))
        doc = None
        if "{" in text:
            try:
                doc = json.loads(text[text.find("{"):text.rfind("}") + 1])
            except ValueError:
                doc = None
        burst = (doc or {}).get("burst") or {}
        failed = [i for i in (doc or {}).get("instances") or [] if not i.get("ok")]
        good = [i for i in (doc or {}).get("instances") or [] if i.get("ok") and i.get("digest_ok")]
        too_late = victim != "none" and bool(burst) and not failed and len(good) == BURST_INSTANCES
        if not too_late or attempts == 3:
            break
    if not row.add("one restored task killed mid-burst", host, victim != "none",
                   f"pid {victim}" + (f" (attempt {attempts})" if attempts > 1 else "")
                   if victim != "none" else "no restored tree of the burst was seen"):
        return
    if not row.add("the burst replied", host, bool(burst), "" if burst else (r.stderr or text)[-300:]):
        return
    row.add("that instance alone failed", host, len(failed) == 1 and len(good) == BURST_INSTANCES - 1,
            f"{len(good)} of {BURST_INSTANCES} answered right with equal digests; failed: "
            + "; ".join(f"#{i.get('index')}: {str(i.get('error'))[:120]}" for i in failed[:3])
            + (f" ({attempts} bursts: every kill came after its instance answered)" if not failed else ""))
    rc, inst, err = c.tierctl(host, "instances", 60)
    row.add("nothing of the burst still running", host, rc == 0 and (inst or {}).get("operations") == 0,
            f"operations in flight: {(inst or {}).get('operations')}" if rc == 0 else err)


def _tier_stats(c: Chaos, host: str, tier: str) -> dict | None:
    rc, status, _ = c.tierctl(host, "status", 60)
    for t in (status or {}).get("tiers", []):
        if t.get("kind") == tier and t.get("up"):
            return t.get("stats") or {}
    return None


def row_fill(c: Chaos, row: Row, tier: str) -> None:
    host = c.snap_host
    if tier == "rdma" and c.memnode is None:
        row.skip("a clear no space", host or "-", "no memory node in this topology (no RDMA pool to fill)")
        return
    if tier == "cxl" and c.cxl is None:
        row.skip("a clear no space", host or "-", "no CXL device in this topology")
        return
    stats = _tier_stats(c, host, tier)
    if stats is None:
        row.skip("a clear no space", host, f"the {tier} tier is not up on {host}")
        return
    free = stats["capacity_bytes"] - stats["used_bytes"]
    data = f"/tmp/chaos-fill-{c.tag}.bin"
    r = c.sh(host, f"head -c {FILL_CHUNK} /dev/urandom > {data} && sha256sum {data}", 300)
    if not row.add("make 64 MiB of page data", host, r.returncode == 0, (r.stderr or "")[-200:] or data):
        return
    digest = r.stdout.split()[0]
    sharers = [h for h in (c.cxl.hosts if tier == "cxl" and c.cxl else [host])]
    stored: list[str] = []
    refusal = None
    used_before_refusal = None
    t0 = time.monotonic()
    try:
        for n in range(free // FILL_CHUNK + 3):
            sid = f"chaos-fill-{tier}-{c.tag}-{n}"
            used_before_refusal = (_tier_stats(c, host, tier) or {}).get("used_bytes")
            rc, doc, err = c.tierctl(host, f"put {sid} {data} --tier {tier}", 600)
            code, message = error_of(rc, doc, err)
            if code is None:
                stored.append(sid)
                c.made.setdefault(host, set()).add(sid)
                continue
            refusal = (sid, code, message)
            break
        used_after = (_tier_stats(c, host, tier) or {}).get("used_bytes")
        row.add("a clear no space", host, refusal is not None and refusal[1] == "no_space",
                (f"after {len(stored)} puts ({len(stored) * FILL_CHUNK // MiB} MiB of {free // MiB} MiB free, "
                 f"{time.monotonic() - t0:.0f} s): {refusal[1]}: {refusal[2][:200]}") if refusal else
                f"{len(stored)} puts of 64 MiB all succeeded: never refused")
        if refusal is None:
            return
        # Nothing half published: the refused id nowhere, every stored one everywhere, no space
        # kept by the refused put.
        problems = []
        for h in sharers:
            rc, listing, err = c.tierctl(h, "list", 60)
            ids = {s.get("id") for s in (listing or {}).get("snapshots", [])}
            if rc != 0:
                problems.append(f"{h}: list: {err}")
                continue
            if refusal[0] in ids:
                problems.append(f"{h} lists the refused {refusal[0]}")
            visible = stored if (tier == "cxl" or h == host) else []
            missing = [s for s in visible if s not in ids]
            if missing:
                problems.append(f"{h} does not list {', '.join(missing[:3])}")
            rc, doc, err = c.tierctl(h, f"info {refusal[0]}", 60)
            if error_of(rc, doc, err)[0] != "not_found":
                problems.append(f"{h}: info {refusal[0]} is not not_found: {error_of(rc, doc, err)}")
        # (Less is fine: a put may first reclaim extents freed earlier.)
        if used_before_refusal is not None and used_after is not None and used_after > used_before_refusal:
            problems.append(f"the refused put kept {used_after - used_before_refusal} bytes of the tier")
        if stored:
            reader = sharers[-1]
            rc, got, err = c.tierctl(reader, f"read {stored[-1]} /tmp/chaos-fill.out", 600)
            if rc != 0 or (got or {}).get("sha256") != digest:
                problems.append(f"{reader}: read {stored[-1]}: {err or 'sha256 differs'}")
            c.sh(reader, "rm -f /tmp/chaos-fill.out", 30)
        row.add("nothing half published", host, not problems,
                "; ".join(problems)[:400] if problems else
                f"the refused id is on no host, {len(stored)} stored ones listed on {', '.join(sharers)}, "
                f"the last reads back byte-exact, the refusal kept no space")
        # Space usable again after deleting.
        problems = c.delete_made()
        for h in sharers:
            if h != host:
                c.tierctl(h, "list", 60)   # its replay announces that it moved past the tombstones
        sid = f"chaos-fill-{tier}-{c.tag}-again"
        rc, doc, err = c.tierctl(host, f"put {sid} {data} --tier {tier}", 600)
        code, message = error_of(rc, doc, err)
        if code is None:
            c.made.setdefault(host, set()).add(sid)
        row.add("space usable again after deleting", host, code is None and not problems,
                "; ".join(problems) or (f"deleted {len(stored)}, then {sid} (64 MiB) stored" if code is None
                                        else f"{code}: {message[:200]}"))
    finally:
        c.sh(host, f"rm -f {data}", 30)


def row_concurrent_publish(c: Chaos, row: Row, rounds: int = 3) -> None:
    if c.cxl is None or len(c.cxl.hosts) < 2:
        row.skip("one winner", "-", "needs two hosts sharing a CXL device")
        return
    a, b = c.cxl.hosts[0], c.cxl.hosts[1]
    digests = {}
    for seed, h in enumerate((a, b)):
        r = c.sh(h, f"head -c {16 * MiB} /dev/urandom > /tmp/chaos-race.bin && sha256sum /tmp/chaos-race.bin", 120)
        if r.returncode != 0:
            row.add("make page data", h, False, (r.stderr or "")[-200:])
            return
        digests[h] = r.stdout.split()[0]
    share = c.state_dir / "share"
    try:
        for n in range(rounds):
            sid = f"chaos-race-{c.tag}-{n}"
            go = f"chaos-go-{c.tag}-{n}"
            used = {h: (_tier_stats(c, h, "cxl") or {}).get("used_bytes") for h in (a, b)}
            put = (f"{agents.GUEST_BUILD}/tierctl --socket {agents.AGENT_SOCKET} --timeout-ms 300000 --json "
                   f"put {sid} /tmp/chaos-race.bin --tier cxl")

            def publish(h):
                return c.probe_json(h, f"wait-file /shared/{go} 60 -- {put}", timeout=400)
            with ThreadPoolExecutor(max_workers=2) as pool:
                futures = {h: pool.submit(publish, h) for h in (a, b)}
                time.sleep(1.0 if c.topo.backend == "native" else 5.0)   # both are waiting at the barrier
                (share / go).write_text("go\n")
                outcome = {h: f.result() for h, f in futures.items()}
            (share / go).unlink(missing_ok=True)
            told = {}
            for h, o in outcome.items():
                doc = tierctl.parse_json_output(o.get("stdout") or "")
                told[h] = error_of(o.get("rc", 1), doc, (o.get("stderr") or "")[-300:])
            winners = [h for h, (code, _) in told.items() if code is None]
            skew = abs((outcome[a].get("started") or 0) - (outcome[b].get("started") or 0)) * 1000
            resolved = {}
            for h in (a, b):
                rc, info, err = c.tierctl(h, f"info {sid}", 60)
                resolved[h] = (info or {}).get("owner_host") if rc == 0 else f"({error_of(rc, info, err)[0]})"
            for h in winners:
                c.made.setdefault(h, set()).add(sid)
            problems = []
            if len(winners) != 1:
                problems.append(f"{len(winners)} hosts were told they published it" if winners else "both were refused")
            if len(set(resolved.values())) != 1 or (winners and list(resolved.values())[0] != winners[0]):
                problems.append("hosts resolve it to " + ", ".join(f"{h}: {o}" for h, o in resolved.items()))
            for h, (code, message) in told.items():
                if h not in winners and winners and (code != "already_exists" or winners[0] not in message):
                    problems.append(f"the loser {h} got {code}: {message[:160]} (not already_exists naming {winners[0]})")
            if len(winners) == 1:
                winner = winners[0]
                loser = b if winner == a else a
                rc, got, err = c.tierctl(loser, f"read {sid} /tmp/chaos-race.out", 120)
                if (got or {}).get("sha256") != digests[winner]:
                    problems.append(f"{loser} reads {(got or {}).get('sha256', err)[:16]}…, not the winner's data")
                after = (_tier_stats(c, loser, "cxl") or {}).get("used_bytes")
                if used[loser] is not None and after is not None and after > used[loser]:
                    problems.append(f"the loser {loser} kept {after - used[loser]} bytes of CXL")
            loser_text = "; ".join(f"{h} told {code}: {message[:110]}" for h, (code, message) in told.items() if code)
            row.add(f"round {n + 1}: one winner", winners[0] if len(winners) == 1 else "-", not problems,
                    "; ".join(problems)[:400] if problems else
                    f"{winners[0]} won (puts started {skew:.1f} ms apart), every host resolves it there; {loser_text}")
            c.delete_made()
    finally:
        for h in (a, b):
            c.sh(h, "rm -f /tmp/chaos-race.bin /tmp/chaos-race.out", 30)


def _needs_memnode(c: Chaos, row: Row, what: str) -> bool:
    if not c.topo.guests:
        row.skip(what, c.memnode or "-", "emulated topologies only: it needs the RDMA memory node, which native "
                 "topologies cannot have on this machine (no rdma_rxe in its kernel)")
        return False
    if c.memnode is None:
        row.skip(what, "-", "no memory node in this topology (no RDMA pool)")
        return False
    return True


def _memnode_row(c: Chaos, row: Row, tag: str, what: str) -> tuple[str, str] | None:
    """The memory-node rows' start: (snapshot id, the host that restores), or None when the
    row stops here (no memory node, no snapshot: the row says why)."""
    if not _needs_memnode(c, row, what):
        return None
    made = c.row_snapshot(row, tag, what)
    if made is None:
        return None
    return made[0], c.peer or c.snap_host


def _restore_ok(c: Chaos, host: str, sid: str, policy: str) -> tuple[bool, str]:
    rc, doc, err = c.restore(host, sid, policy)
    code, message = error_of(rc, doc, err)
    if code is None and (doc or {}).get("digest_ok"):
        return True, f"{policy}: first response {doc.get('first_response_ms', 0):.0f} ms, digest equal"
    return False, f"{policy}: {code}: {message[:200]}"


def row_memnode_stall(c: Chaos, row: Row) -> None:
    started = _memnode_row(c, row, "stall", "SIGSTOP the memory node mid-restore")
    if started is None:
        return
    sid, host = started
    pid = c.memnode_pid()
    if not row.add("memory node's QEMU found", c.memnode, pid is not None, f"pid {pid}"):
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        t0 = time.monotonic()
        future = pool.submit(c.restore, host, sid, "lazy-rdma")
        time.sleep(1.0)   # ssh and criu restore under way; the RDMA faults follow
        in_flight = not future.done()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        rc, doc, err = future.result()
    code, message = error_of(rc, doc, err)
    ended = f"ok in {time.monotonic() - t0:.0f} s" if code is None else f"{code}: {message[:200]}"
    row.add("restore during a 5 s stall ends", host, in_flight and code in (None, "timeout", "io", "unavailable", "failed"),
            (f"stall began with the restore in flight; it ended: {ended}" if in_flight else
             f"the restore had ended before the stall began ({ended})"))
    for policy in ("lazy-rdma", "tiered"):
        ok, detail = _restore_ok(c, host, sid, policy)
        row.add(f"next {policy} restore succeeds, nothing restarted", host, ok, detail)


def row_memnode_agent_restart(c: Chaos, row: Row) -> None:
    started = _memnode_row(c, row, "pool", "restart the memory node's agent")
    if started is None:
        return
    sid, host = started
    rc, before, err = c.tierctl(host, f"read {sid}:rdma /tmp/chaos-pool.out", 600)
    if not row.add("read the RDMA copy", host, rc == 0, (before or {}).get("sha256", "")[:16] or err):
        return
    agents.stop(c.topo, [c.memnode])
    agents.start(c.topo)
    rc, after, err = c.tierctl(host, f"read {sid}:rdma /tmp/chaos-pool.out", 600)
    row.add("RDMA copy byte-exact after the pool's agent restarted", host,
            rc == 0 and after.get("sha256") == before.get("sha256"),
            "sha256 equal" if rc == 0 and after.get("sha256") == before.get("sha256") else err or "sha256 differs")
    for policy in ("lazy-rdma", "tiered"):
        ok, detail = _restore_ok(c, host, sid, policy)
        row.add(f"{policy} restores byte-exact", host, ok, detail)
    c.sh(host, "rm -f /tmp/chaos-pool.out", 30)


def _rdma_state(c: Chaos, host: str) -> tuple[str, str]:
    rc, status, err = c.tierctl(host, "status", 60)
    if rc != 0:
        return "unknown", err
    for t in (status or {}).get("tiers", []):
        if t.get("kind") == "rdma":
            why = (t.get("reconnect") or {}).get("last_error") or (t.get("error") or {}).get("message") or ""
            return str(t.get("state") or ("up" if t.get("up") else "down")), str(why)
    return "absent", "no rdma tier in its status"


def row_memnode_late(c: Chaos, row: Row) -> None:
    """A compute agent that starts while the memory node's agent is down uses the pool once it
    comes, without a restart."""
    started = _memnode_row(c, row, "late", "a compute agent started before its memory node")
    if started is None:
        return
    sid, host = started
    agents.stop(c.topo, [c.memnode, host])
    agents.start(c.topo, hosts=[host])
    state, why = _rdma_state(c, host)
    row.add("started without its memory node: the tier says so", host, state in ("reconnecting", "down"),
            f"rdma {state}: {why[:160]}")
    agents.start(c.topo)  # the memory node's agent (the pool file kept its pages)
    deadline = time.monotonic() + 90
    while state != "up" and time.monotonic() < deadline:
        time.sleep(2)
        state, why = _rdma_state(c, host)
    row.add("the tier comes up once the memory node does, nothing restarted", host, state == "up",
            f"rdma {state}" + (f": {why[:160]}" if state != "up" else ""))
    ok, detail = _restore_ok(c, host, sid, "lazy-rdma")
    row.add("lazy-rdma restores byte-exact", host, ok, detail)


ROW_PROMISES = {"memnode-stall": "SIGSTOP the memory node mid-restore",
                "memnode-agent-restart": "restart the memory node's agent",
                "memnode-late": "a compute agent started before its memory node", "fill-rdma": "a clear no space"}
RUNNERS = {
    "corrupt-cxl": row_corrupt_cxl,
    "kill-agent-mid-restore": row_kill_agent,
    "kill-burst-instance": row_kill_burst_instance,
    "fill-cxl": lambda c, r: row_fill(c, r, "cxl"),
    "fill-file": lambda c, r: row_fill(c, r, "file"),
    "fill-rdma": lambda c, r: row_fill(c, r, "rdma"),
    "concurrent-publish": row_concurrent_publish,
    "memnode-stall": row_memnode_stall,
    "memnode-agent-restart": row_memnode_agent_restart,
    "memnode-late": row_memnode_late,
}


def static_skip(topo: Topology, name: str) -> str | None:
    """Why a row cannot run on this topology at all (known without contacting a host), or None."""
    if name in ("memnode-stall", "memnode-agent-restart", "memnode-late"):
        if not topo.guests:
            return ("emulated topologies only: it needs the RDMA memory node, which native topologies cannot "
                    "have on this machine (no rdma_rxe in its kernel)")
        if not any(h.role == "memory" for h in topo.hosts):
            return "no memory node in this topology (no RDMA pool)"
    if name == "fill-rdma" and not any(h.role == "memory" for h in topo.hosts):
        return "no memory node in this topology (no RDMA pool to fill)"
    return None


def write_report(path: Path, topo: Topology, rows: list[Row], started: str, function: str) -> dict:
    checks = [c for r in rows for c in r.checks]
    report = {"topology": topo.name, "backend": topo.backend, "date": started, "function": function,
              "git": matrix.git_commit(),
              "passed": sum(c.ok and not c.skipped for c in checks), "failed": sum(not c.ok for c in checks),
              "skipped": sum(c.skipped for c in checks),
              "rows": [{"row": r.name, "seconds": round(r.seconds, 1),
                        "ok": all(c.ok for c in r.checks), "checks": [asdict(c) for c in r.checks]} for r in rows]}
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    return report


def run_chaos(topo: Topology, rows: list[str], function: str = "helloworld", run=None,
              ensure_agents=None) -> int:
    if run is None:
        launcher.load_running(topo)
    c = Chaos(topo, function, run=run)
    if ensure_agents is not None:
        c.ensure_agents = lambda: ensure_agents(topo)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = c.state_dir / "chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    done: list[Row] = []
    if any(static_skip(topo, r) is None for r in rows):
        c.ensure_agents()
    for name in rows:
        row = Row(name)
        tr = time.monotonic()
        say(f"chaos: {name}")
        reason = static_skip(topo, name)
        if reason:
            row.skip(ROW_PROMISES[name], "-", reason)
        else:
            try:
                RUNNERS[name](c, row)
            except TestbedError as e:
                row.add("ran to the end", "-", False, str(e)[:300])
            finally:
                c.healthy(row)
        row.seconds = time.monotonic() - tr
        done.append(row)
        write_report(out, topo, done, started, function)
    checks = [ch for r in done for ch in r.checks]
    print(f"results: {out}")
    return print_checks(f"chaos on topology {topo.name} ({time.monotonic() - t0:.0f} s, function {function})",
                        checks, "chaos")
