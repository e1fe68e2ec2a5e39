"""tb burst: many instances of one snapshot restored at once on every host, from one shared copy.

The function is snapshotted once on the first of --hosts (`tierctl snapshot`, as tb matrix does).
Then, for every instance count N and every policy (a cell), each host's agent is asked at the same
moment, one thread per host, to restore N instances (`tierctl restore ID --policy P --instances
N`, run on that host: a host other than the snapshot host reads the one copy in the shared CXL
device and the RDMA pool). The agent starts all N at once, holds them until every one answered,
checks each (answer, state digest) and ends them; its BurstResult lists every instance (N = 1
answers a FunctionRestoreResult, read here as a burst of one). After each cell every host is
asked for what is still running (`tierctl instances`): an operation in flight or an instance
alive that was not there before the run fails the cell.

Outputs (in --out, default run/<topology>/results/burst-<UTC time>/, rewritten after every cell):
results.json (raw tierctl objects and the run's metadata), burst.csv (one row per policy x
instances x host plus an "all" row per cell), instances.csv (one row per instance), burst.png,
and a markdown table on stdout. Exit status 0 iff every instance of every cell answered right
with an equal digest (busy instances count as failed unless --allow-busy) and nothing was left
running; 1 otherwise; 2 for usage errors (nothing contacted). Reference: docs/testbed.md.
"""
from __future__ import annotations

import secrets
import shlex
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import agents, launcher, matrix, tierctl
from .launcher import TestbedError, say
from .matrix import UsageError, fmt_number, number_or_none
from .topology import MiB, Topology

MAX_INSTANCES = 256                 # FunctionRestoreArgs.instances (docs/schema/control.schema.json)
RESTORE_TIMEOUT_S = matrix.RESTORE_TIMEOUT_S
# Instances of a burst share the host's CPUs, so a burst of N can take up to N times as long as
# one restore on a one-CPU guest; each further instance buys this much more time.
TIMEOUT_PER_EXTRA_INSTANCE_S = 60
INSTANCES_TIMEOUT_S = 60
# The agent replies once it ended every instance; a count it lowers a moment later is not a leak.
LEFTOVER_GRACE_S = 5.0
START_BARRIER_S = 30
DEFAULT_FUNCTION = "matmul"
DEFAULT_POLICIES = "criu-eager,reap,tiered"
DEFAULT_INSTANCES = "1,2,4"
PREFERRED_BASELINE = "criu-eager"
ALL_HOSTS = "all"


# ------------------------------------------------------------------ arguments
@dataclass(frozen=True)
class BurstPlan:
    function: str
    policies: list[str]
    instance_counts: list[int]
    hosts: list[str]                 # the first one takes the snapshot
    out_dir: Path
    allow_busy: bool = False
    keep: bool = False

    @property
    def snapshot_host(self) -> str:
        return self.hosts[0]

    @property
    def baseline(self) -> str:
        return baseline_policy(self.policies)


def baseline_policy(policies: list[str]) -> str:
    return PREFERRED_BASELINE if PREFERRED_BASELINE in policies else policies[0]


def parse_instance_counts(text: str) -> list[int]:
    """--instances 1,2,4: whole numbers in 1..256, ascending, duplicates dropped."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise UsageError(f"--instances: empty list; give counts from 1 to {MAX_INSTANCES}, e.g. 1,2,4")
    counts = []
    for w in words:
        try:
            n = int(w)
        except ValueError:
            raise UsageError(f"--instances: {w!r} is not a whole number") from None
        if not 1 <= n <= MAX_INSTANCES:
            raise UsageError(f"--instances: {n} is outside 1..{MAX_INSTANCES} (the agent's bound per request)")
        counts.append(n)
    return sorted(set(counts))


def has_rdma_pool(topo: Topology) -> bool:
    return any(h.role == "memory" for h in topo.hosts)


def shares_copies_with(topo: Topology, snap_host: str, host: str) -> bool:
    """`host` can read the snapshot host's published copies: the same CXL device, or an RDMA link
    with a memory node on it (the pool)."""
    if host == snap_host:
        return True
    dev = topo.cxl_of(snap_host)
    if dev and host in dev.hosts:
        return True
    link = topo.link_of(snap_host)
    return bool(link and link.rdma and host in link.hosts
                and any(topo.host(h).role == "memory" for h in link.hosts))


def pick_burst_hosts(topo: Topology, text: str | None) -> list[str]:
    compute = [h.name for h in topo.hosts if h.role == "compute"]
    if not compute:
        raise UsageError(f"topology {topo.name!r} has no compute host")
    if text is None:
        snap = compute[0]
        if not has_rdma_pool(topo):
            # Without a pool the `tiered` copy keeps its cold pages in the snapshot host's file
            # tier (not published): other hosts could not restore it, and the cells of the
            # policies would cover different hosts.
            say(f"topology {topo.name!r} has no RDMA pool: the burst runs on {snap} only "
                f"(give --hosts {','.join(compute)} for every host; a policy whose copy is private to {snap} "
                "is skipped on the others)")
            return [snap]
        return [h for h in compute if shares_copies_with(topo, snap, h)]
    hosts = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not hosts:
        raise UsageError(f"--hosts: empty list; compute hosts: {', '.join(compute)}")
    known = {h.name for h in topo.hosts}
    for h in hosts:
        if h not in compute:
            what = "is a memory node" if h in known else f"is not a host of topology {topo.name!r}"
            raise UsageError(f"--hosts: {h!r} {what}; compute hosts: {', '.join(compute)}")
    for h in hosts[1:]:
        if not shares_copies_with(topo, hosts[0], h):
            raise UsageError(f"--hosts: {h} shares no CXL device and no RDMA pool with {hosts[0]} (the first "
                             "host takes the snapshot): it cannot read the shared copy")
    return hosts


def plan_from_args(topo: Topology, args) -> BurstPlan:
    """Every check that needs no guest; raises UsageError (exit 2)."""
    function = matrix.parse_list(args.function, matrix.available_functions(), "function", "--function")
    if len(function) != 1:
        raise UsageError(f"--function: one function per burst, not {', '.join(function)}")
    policies = matrix.parse_list(args.policies, matrix.known_policies(), "policy", "--policies")
    counts = parse_instance_counts(args.instances)
    hosts = pick_burst_hosts(topo, args.hosts)
    out_dir = Path(args.out) if args.out else matrix.default_out_dir(topo, "burst")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    return BurstPlan(function=function[0], policies=policies, instance_counts=counts, hosts=hosts,
                     out_dir=out_dir, allow_busy=bool(args.allow_busy), keep=bool(args.keep))


def restore_timeout_s(instances: int) -> int:
    return RESTORE_TIMEOUT_S + TIMEOUT_PER_EXTRA_INSTANCE_S * (instances - 1)


def restore_command(snapshot_id: str, policy: str, instances: int) -> str:
    # Always a burst, a burst of one too: its times then count from the burst's start like the
    # others' (materializing the images included), not from criu restore as a single restore's do.
    return f"restore {shlex.quote(snapshot_id)} --policy {shlex.quote(policy)} --instances {instances}"


# ------------------------------------------------------------------ reading the agent's objects
def is_error_reply(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


def as_burst(doc) -> dict | None:
    """A BurstResult as is; a FunctionRestoreResult (instances = 1) as a burst of that one
    instance, which started when the burst began and answered at its first response."""
    if not isinstance(doc, dict) or is_error_reply(doc):
        return None
    if isinstance(doc.get("instances"), list):
        return doc
    if "ok" not in doc:
        return None
    instance = {**doc, "index": 0, "busy": False, "started_at_ms": 0.0,
                "answered_at_ms": number_or_none(doc.get("first_response_ms"))}
    return {"snapshot": doc.get("snapshot"), "policy": doc.get("policy"), "host": doc.get("host"),
            "instances": [instance], "burst": None, "single": True}


def instance_row(inst: dict, policy: str, instances: int, host: str, function: str,
                 allow_busy: bool = False) -> dict:
    """One instance as tb matrix judges one restore (ok, right answer, equal digest, on `host`),
    plus its place in the burst."""
    busy = inst.get("busy") is True
    base = matrix.row_of({"function": function, "policy": policy, "restore_host": host,
                          "restore": {} if busy else inst})
    row = {
        "policy": policy, "instances": instances, "host": host, "index": inst.get("index"),
        "busy": busy, "ok": bool(base["ok"]) and not busy,
        "started_at_ms": number_or_none(inst.get("started_at_ms")),
        "answered_at_ms": number_or_none(inst.get("answered_at_ms")),
        "restore_ms": base["restore_ms"], "first_response_ms": base["first_response_ms"],
        "faults_total": base["faults_total"],
        "local_anonymous_bytes": number_or_none(inst.get("local_anonymous_bytes")),
        "local_memory_bytes": number_or_none(inst.get("local_memory_bytes")),
        "cxl_mapped_bytes": number_or_none(inst.get("cxl_mapped_bytes")),
        "pages_mapped_in_place": number_or_none(inst.get("pages_mapped_in_place")),
    }
    moved = inst.get("bytes_moved_per_tier") if isinstance(inst.get("bytes_moved_per_tier"), dict) else {}
    for tier, n in moved.items():
        row[f"bytes_{tier}"] = number_or_none(n)
    row.update({"answer_ok": base["answer_ok"], "digest_ok": base["digest_ok"]})
    if busy:
        why = inst.get("error") or "refused by the host's bound on concurrent operations ([functions] max_operations)"
        row["error"] = f"busy: {why}" + (" (allowed: --allow-busy)" if allow_busy else "")
    else:
        row["error"] = base["error"]
    row["counts_as_failure"] = not row["ok"] and not (busy and allow_busy)
    return row


def _sum(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _ratio(mine, ref, scale: float = 1.0, digits: int = 2) -> float | None:
    return round(scale * mine / ref, digits) if mine is not None and ref else None


def tier_keys(rows: list[dict]) -> list[str]:
    """bytes_<tier> columns: cxl and rdma always, then the others some row has, in a fixed order."""
    seen = {k[len("bytes_"):] for r in rows for k in r if k.startswith("bytes_")}
    order = list(matrix.TIER_ORDER) + sorted(seen - set(matrix.TIER_ORDER))
    return [f"bytes_{t}" for t in order if t in matrix.FIXED_TIERS or t in seen]


def summary_notes(agent: dict | None, mine: dict) -> list[str]:
    """Where the agent's own BurstSummary disagrees with the sums over its instances: reported,
    not failed (the instances are what is checked)."""
    if not isinstance(agent, dict):
        return []
    notes = []
    for theirs, ours in (("ok", "ok_instances"), ("busy", "busy"), ("failed", "failed"),
                         ("local_anonymous_bytes_sum", "local_anonymous_bytes"), ("faults_total", "faults_total")):
        a, b = number_or_none(agent.get(theirs)), mine.get(ours)
        if a is not None and b is not None and a != b:
            notes.append(f"the agent's burst.{theirs} is {a}, its instances sum to {b}")
    for key in ("first_answer_ms", "last_answer_ms"):
        a, b = number_or_none(agent.get(key)), mine.get(key)
        if a is not None and b is not None and abs(a - b) > 0.5:
            notes.append(f"the agent's burst.{key} is {a}, its instances say {b}")
    return notes


def host_row(cell: dict, host_part: dict, function: str, allow_busy: bool) -> tuple[dict, list[dict]]:
    """The row of one host of a cell (sums over its instances) and its instances' rows."""
    policy, n, host = cell["policy"], cell["instances"], host_part["host"]
    row: dict = {"policy": policy, "instances": n, "host": host, "hosts": 1, "requested": n}
    errors: list[str] = []
    leftovers = host_part.get("leftovers") or {}
    row["leftover_operations"] = leftovers.get("operations")
    row["leftover_instances"] = len(leftovers.get("instances") or []) if leftovers else None
    if leftovers.get("error"):
        errors.append(leftovers["error"])
    elif leftovers.get("operations") or leftovers.get("instances"):
        left = [f"{leftovers['operations']} function operations in flight"] if leftovers.get("operations") else []
        if leftovers.get("instances"):
            left.append(f"instances {', '.join(map(str, leftovers['instances']))} alive")
        errors.append(f"left running after the burst: {' and '.join(left)}")
    if host_part.get("skipped"):
        row.update({"skipped": host_part["skipped"], "ok": not errors,
                    "error": " | ".join(errors) or None})
        return row, []
    doc = host_part.get("result")
    burst = as_burst(doc)
    inst_rows = [instance_row(i, policy, n, host, function, allow_busy)
                 for i in (burst or {}).get("instances") or [] if isinstance(i, dict)]
    busy_reply = is_error_reply(doc) and doc["error"].get("code") == "busy"
    if host_part.get("error"):
        errors.append(host_part["error"])
    if is_error_reply(doc):
        e = doc["error"]
        errors.append(f"{e.get('code')}: {e.get('message', '')}" + (" (allowed: --allow-busy)" if busy_reply
                                                                        and allow_busy else ""))
    elif burst is None and not host_part.get("error"):
        errors.append("no restore result")
    if burst and burst.get("host") and burst["host"] != host:
        errors.append(f"the burst ran on {burst['host']}, not on {host}")
    busy = n if busy_reply else sum(r["busy"] for r in inst_rows)
    ok_instances = sum(r["ok"] for r in inst_rows)
    failed = sum(not r["ok"] and not r["busy"] for r in inst_rows)
    missing = 0 if busy_reply or burst is None else max(0, n - len(inst_rows))
    if burst is not None and len(inst_rows) > n:
        errors.append(f"{len(inst_rows)} instances reported for {n} requested")
    if missing:
        errors.append(f"{missing} of {n} instances missing from the result")
    for r in inst_rows:
        if r["counts_as_failure"]:
            errors.append(f"instance {r['index']}: {r['error']}")
    answered = [r["answered_at_ms"] for r in inst_rows if r["answered_at_ms"] is not None]
    started = [r for r in inst_rows if not r["busy"]]
    ok_first = [r["first_response_ms"] for r in inst_rows if r["ok"] and r["first_response_ms"] is not None]
    ok_restore = [r["restore_ms"] for r in inst_rows if r["ok"] and r["restore_ms"] is not None]
    last = max(answered) if answered else None
    row.update({
        "answered": len(answered), "ok_instances": ok_instances, "failed": failed, "busy": busy,
        "missing": missing,
        "first_answer_ms": min(answered) if answered else None, "last_answer_ms": last,
        "instances_per_s": round(1000.0 * len(answered) / last, 2) if last else None,
        "first_response_median_ms": statistics.median(ok_first) if ok_first else None,
        "first_response_max_ms": max(ok_first) if ok_first else None,
        "restore_median_ms": statistics.median(ok_restore) if ok_restore else None,
        "faults_total": _sum(r["faults_total"] for r in started),
        "local_anonymous_bytes": _sum(r["local_anonymous_bytes"] for r in started),
        "local_memory_bytes": _sum(r["local_memory_bytes"] for r in started),
        "cxl_mapped_bytes": _sum(r["cxl_mapped_bytes"] for r in started),
    })
    for key in tier_keys(inst_rows):
        row[key] = _sum(r.get(key) for r in started)
    # What the copy itself occupies per tier: one copy for every instance, however many.
    stored = next((i["snapshot_bytes_per_tier"] for i in (burst or {}).get("instances") or []
                   if isinstance(i, dict) and isinstance(i.get("snapshot_bytes_per_tier"), dict)), {})
    for tier in STORED_TIERS:
        row[f"stored_{tier}_bytes"] = number_or_none(stored.get(tier)) if stored else None
    agent = (burst or {}).get("burst") if isinstance((burst or {}).get("burst"), dict) else None
    before, peak = (number_or_none((agent or {}).get(k)) for k in ("agent_rss_bytes_before", "agent_rss_bytes_peak"))
    threads_before, threads_at_hold = (number_or_none((agent or {}).get(k))
                                       for k in ("agent_threads_before", "agent_threads_at_hold"))
    row.update({
        "wall_ms": number_or_none((agent or {}).get("wall_ms")),
        "host_memory_used_bytes": number_or_none((agent or {}).get("host_memory_used_bytes")),
        "agent_rss_growth_bytes": peak - before if peak is not None and before is not None else None,
        "agent_threads_added": (threads_at_hold - threads_before
                                 if threads_at_hold is not None and threads_before is not None else None),
        "serving": (agent or {}).get("serving"),
        "sent_at_ms": host_part.get("sent_at_ms"), "replied_at_ms": host_part.get("replied_at_ms"),
    })
    row["notes"] = "; ".join(summary_notes(agent, row)) or None
    row["ok"] = not errors and ok_instances >= 1 and failed == 0 and missing == 0 and (busy == 0 or allow_busy)
    if not errors and not row["ok"]:
        errors.append("no instance answered correctly" if ok_instances == 0 else "not every instance was ok")
    row["skipped"] = None
    row["error"] = " | ".join(dict.fromkeys(errors)) or None
    return row, inst_rows


SUMMED = ("requested", "answered", "ok_instances", "failed", "busy", "missing", "faults_total",
          "local_anonymous_bytes", "local_memory_bytes", "cxl_mapped_bytes", "agent_rss_growth_bytes",
          "agent_threads_added")


def all_row(cell: dict, rows: list[dict]) -> dict:
    """The cell over every host: counts and memory summed, the first answer the earliest of the
    hosts', the last the latest (each host counts from its own burst's start; the hosts started
    within launch_skew_ms of each other)."""
    ran = [r for r in rows if not r.get("skipped")]
    row: dict = {"policy": cell["policy"], "instances": cell["instances"], "host": ALL_HOSTS, "hosts": len(ran),
                 "host_names": ",".join(r["host"] for r in ran)}
    errors = [f"{r['host']}: {r['error']}" for r in rows if r.get("error")]
    if not ran:
        reasons = list(dict.fromkeys(r["skipped"] for r in rows))
        row.update({"skipped": "; ".join(reasons), "ok": not errors, "error": " | ".join(errors) or None})
        return row
    for key in SUMMED:
        row[key] = _sum(r.get(key) for r in ran)
    for key in tier_keys(ran):
        row[key] = _sum(r.get(key) for r in ran)
    firsts = [r["first_answer_ms"] for r in ran if r.get("first_answer_ms") is not None]
    lasts = [r["last_answer_ms"] for r in ran if r.get("last_answer_ms") is not None]
    row["first_answer_ms"] = min(firsts) if firsts else None
    row["last_answer_ms"] = max(lasts) if lasts else None
    row["instances_per_s"] = (round(1000.0 * row["answered"] / row["last_answer_ms"], 2)
                              if row["last_answer_ms"] and row["answered"] else None)
    for key, pick in (("first_response_median_ms", statistics.median), ("first_response_max_ms", max),
                      ("restore_median_ms", statistics.median), ("wall_ms", max)):
        values = [r[key] for r in ran if r.get(key) is not None]
        row[key] = pick(values) if values else None
    for tier in STORED_TIERS:  # the same copy on every host: not summed
        values = [r.get(f"stored_{tier}_bytes") for r in ran if r.get(f"stored_{tier}_bytes") is not None]
        row[f"stored_{tier}_bytes"] = max(values) if values else None
    used = [r.get("host_memory_used_bytes") for r in ran]
    row["host_memory_used_bytes"] = sum(used) if all(u is not None for u in used) else None
    sent = [r["sent_at_ms"] for r in ran if r.get("sent_at_ms") is not None]
    row["launch_skew_ms"] = round(max(sent) - min(sent), 1) if sent else None
    row["leftover_operations"] = _sum(r.get("leftover_operations") for r in rows)
    row["leftover_instances"] = _sum(r.get("leftover_instances") for r in rows)
    row["notes"] = "; ".join(f"{r['host']}: {r['notes']}" for r in ran if r.get("notes")) or None
    row["skipped"] = None
    row["ok"] = all(r["ok"] for r in rows)
    row["error"] = " | ".join(errors) or None
    return row


def add_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """Against the baseline policy at the same instance count and host (the "all" rows only when
    both ran on the same hosts): last answer and local anonymous memory, in percent. Against the
    same policy's smallest instance count that passed: how they grow, as a factor."""
    by = {(r["policy"], r["instances"], r["host"]): r for r in rows}
    usable = [r for r in rows if r["ok"] and not r.get("skipped")]
    fewest = {}
    for r in sorted(usable, key=lambda r: r["instances"]):
        fewest.setdefault((r["policy"], r["host"]), r)
    for r in rows:
        r["baseline"] = baseline
        ran = r["ok"] and not r.get("skipped")
        base = by.get((baseline, r["instances"], r["host"]))
        comparable = (ran and base is not None and base["ok"] and not base.get("skipped")
                      and base.get("host_names") == r.get("host_names"))
        first = fewest.get((r["policy"], r["host"])) if ran else None
        for name, key in (("last_answer", "last_answer_ms"), ("local_anonymous", "local_anonymous_bytes")):
            r[f"{name}_vs_baseline_pct"] = _ratio(r.get(key), base.get(key), 100.0, 1) if comparable else None
            r[f"{name}_growth_x"] = _ratio(r.get(key), first.get(key)) if first else None
        anon, started = r.get("local_anonymous_bytes"), (r.get("requested") or 0) - (r.get("busy") or 0)
        r["local_anonymous_per_instance_MiB"] = round(anon / started / MiB, 2) if anon is not None and started > 0 else None
        r["local_anonymous_MiB"] = round(anon / MiB, 2) if anon is not None else None
    return rows


def rows_of(results: dict) -> tuple[list[dict], list[dict]]:
    """(burst rows: per host, then "all", per cell; instance rows) from a results.json."""
    rows, inst_rows = [], []
    for cell in results.get("cells", []):
        cell_rows = []
        for part in cell.get("hosts", []):
            r, irows = host_row(cell, part, results.get("function", ""), bool(results.get("allow_busy")))
            cell_rows.append(r)
            inst_rows += irows
        if cell.get("error"):   # nothing was sent (the snapshot failed)
            cell_rows = cell_rows or [{"policy": cell["policy"], "instances": cell["instances"],
                                       "host": h, "hosts": 1, "ok": False, "skipped": None,
                                       "error": cell["error"]} for h in results.get("hosts", [])]
        rows += cell_rows + [all_row(cell, cell_rows)]
    policies = results.get("policies") or list(dict.fromkeys(r["policy"] for r in rows)) or [PREFERRED_BASELINE]
    return add_ratios(rows, baseline_policy(policies)), inst_rows


def exit_status(rows: list[dict]) -> int:
    return 0 if rows and all(r["ok"] for r in rows) else 1


# ------------------------------------------------------------------ outputs
FRONT = ["policy", "instances", "host", "hosts", "ok", "skipped", "requested", "answered", "ok_instances",
         "failed", "busy", "missing", "first_answer_ms", "last_answer_ms", "instances_per_s",
         "first_response_median_ms", "first_response_max_ms", "restore_median_ms", "wall_ms", "launch_skew_ms",
         "faults_total", "local_anonymous_bytes", "local_anonymous_MiB", "local_anonymous_per_instance_MiB",
         "local_memory_bytes", "cxl_mapped_bytes"]
STORED_TIERS = ("cxl", "rdma", "file")
BACK = ["stored_cxl_bytes", "stored_rdma_bytes", "stored_file_bytes", "host_memory_used_bytes", "agent_rss_growth_bytes", "agent_threads_added", "serving", "leftover_operations", "leftover_instances",
        "baseline", "last_answer_vs_baseline_pct", "local_anonymous_vs_baseline_pct", "last_answer_growth_x",
        "local_anonymous_growth_x", "error", "notes"]
INSTANCE_COLUMNS = ["policy", "instances", "host", "index", "busy", "ok", "started_at_ms", "answered_at_ms",
                    "restore_ms", "first_response_ms", "faults_total", "local_anonymous_bytes", "local_memory_bytes",
                    "cxl_mapped_bytes", "pages_mapped_in_place"]


def csv_columns(rows: list[dict]) -> list[str]:
    return FRONT + tier_keys(rows) + BACK


def write_outputs(out_dir: Path, results: dict) -> list[dict]:
    """results.json, burst.csv and instances.csv; returns the burst rows."""
    rows, inst_rows = rows_of(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix.write_json_atomic(out_dir / "results.json", {**results, "rows": rows})
    matrix.write_csv_rows(out_dir / "burst.csv", csv_columns(rows), rows)
    matrix.write_csv_rows(out_dir / "instances.csv",
                          INSTANCE_COLUMNS + tier_keys(inst_rows) + ["answer_ok", "digest_ok", "error"], inst_rows)
    return rows


def _mib(value) -> str:
    return fmt_number(value / MiB) if value is not None else "-"


def _result_word(r: dict) -> str:
    return "skip" if r.get("skipped") else "ok" if r["ok"] else "FAIL"


def render_table(results: dict, rows: list[dict]) -> str:
    """A markdown table of the cells over every host, the failures below it, and a closing
    'burst: N passed, N failed' line."""
    cells = sorted((r for r in rows if r["host"] == ALL_HOSTS),
                   key=lambda r: ((results.get("policies") or []).index(r["policy"])
                                  if r["policy"] in (results.get("policies") or []) else 99, r["instances"]))
    tiers = tier_keys(cells)
    base = rows[0]["baseline"] if rows else PREFERRED_BASELINE
    clock = ("native hosts: real CPU and DRAM, CXL at DRAM speed" if results.get("backend") == "native"
             else "emulated hardware: compare ratios, not absolutes")
    head = (["policy", "instances", "hosts", "result", "ok/failed/busy", "first answer ms", "last answer ms",
             "instances/s", "local anon MiB", "per instance MiB"]
            + [f"{k[len('bytes_'):]} MiB" for k in tiers]
            + ["stored cxl/rdma MiB"]
            + [f"last vs {base}", f"local vs {base}", "last growth", "local growth"])
    out = [f"burst of {results.get('function')} on topology {results.get('topology')}: snapshot on "
           f"{results.get('snapshot_host')}, restored on {', '.join(results.get('hosts') or [])} at once ({clock})",
           "", "| " + " | ".join(head) + " |", "|" + "|".join("---:" if i > 3 else "---" for i in range(len(head))) + "|"]

    def pct(v):
        return matrix.fmt_pct(v)

    def times(v):
        return f"{v:.2f}x" if v is not None else "-"
    for r in cells:
        counts = (f"{r.get('ok_instances') or 0}/{r.get('failed') or 0}/{r.get('busy') or 0}"
                  if not r.get("skipped") else "-")
        out.append("| " + " | ".join(
            [r["policy"], str(r["instances"]), str(r.get("hosts") or 0), _result_word(r), counts,
             fmt_number(r.get("first_answer_ms")), fmt_number(r.get("last_answer_ms")),
             fmt_number(r.get("instances_per_s"), ".2f"), _mib(r.get("local_anonymous_bytes")),
             fmt_number(r.get("local_anonymous_per_instance_MiB"), ".2f")]
            + [_mib(r.get(k)) for k in tiers]
            + [f"{_mib(r.get('stored_cxl_bytes'))}/{_mib(r.get('stored_rdma_bytes'))}"]
            + [pct(r.get("last_answer_vs_baseline_pct")), pct(r.get("local_anonymous_vs_baseline_pct")),
               times(r.get("last_answer_growth_x")), times(r.get("local_anonymous_growth_x"))]) + " |")
    failed = [r for r in rows if not r["ok"] and r["host"] != ALL_HOSTS]
    skipped = [r for r in rows if r.get("skipped") and r["host"] != ALL_HOSTS]
    if failed:
        out += ["", "failures:"] + [f"  {r['policy']} x{r['instances']} on {r['host']}: {r['error']}" for r in failed]
    if skipped:
        out += ["", "skipped (not failed):"] + [f"  {r['policy']} on {r['host']}: {r['skipped']}" for r in
                                                 {(r["policy"], r["host"]): r for r in skipped}.values()]
    n_failed = sum(not r["ok"] for r in cells)
    n_skipped = sum(bool(r.get("skipped")) and r["ok"] for r in cells)
    out.append("")
    out.append(f"burst: {len(cells) - n_failed - n_skipped} passed, {n_failed} failed"
               + (f", {n_skipped} skipped" if n_skipped else "")
               + " (cells of policy x instances; times since each host's burst began)")
    return "\n".join(out)


def plot(results: dict, png: Path) -> Path:
    """Two panels against the instance count (log2): when the last instance answered, and the
    local anonymous memory summed over the hosts; one line per policy, failed cells marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = rows_of(results)
    cells = [r for r in rows if r["host"] == ALL_HOSTS]
    policies = list(dict.fromkeys(results.get("policies") or [r["policy"] for r in cells]))
    counts = sorted({r["instances"] for r in cells}) or [1]
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    for ax, key, scale, label in ((axes[0], "last_answer_ms", 1.0, "last instance answered [ms]"),
                                  (axes[1], "local_anonymous_bytes", 1.0 / MiB,
                                   "local anonymous memory, all hosts [MiB]")):
        for i, policy in enumerate(policies):
            mine = sorted((r for r in cells if r["policy"] == policy), key=lambda r: r["instances"])
            good = [r for r in mine if r["ok"] and not r.get("skipped") and r.get(key) is not None]
            ax.plot([r["instances"] for r in good], [r[key] * scale for r in good], marker="o", color=f"C{i}",
                    label=policy)
            bad = [r for r in mine if not r["ok"]]
            if bad:
                ax.plot([r["instances"] for r in bad], [0] * len(bad), linestyle="none", marker="x", color=f"C{i}",
                        markersize=9, label=f"{policy} failed")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
        ax.grid(which="major", alpha=0.3)
    axes[1].set_xticks(counts)
    axes[1].set_xticklabels([str(c) for c in counts])
    axes[1].set_xlabel("instances per host")
    axes[0].legend(fontsize=8, title="policy", title_fontsize=8)
    axes[0].set_title(f"snaptier burst of {results.get('function')}, topology {results.get('topology')}: "
                      f"{len(results.get('hosts') or [])} hosts at once "
                      f"({'native' if results.get('backend') == 'native' else 'emulated: compare ratios'})",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def load_results(results_dir: Path) -> dict:
    path = results_dir / "results.json" if results_dir.is_dir() else results_dir
    doc = matrix.load_results(path, "burst")
    if not isinstance(doc.get("cells"), list) or "instance_counts" not in doc:
        raise UsageError(f"{path} is not the results.json of a burst")
    return doc


# ------------------------------------------------------------------ running
def on_every_host(hosts: list[str], call, barrier_s: float = START_BARRIER_S) -> list[dict]:
    """call(host) on every host at the same moment, one thread each: they meet at a barrier
    first so no host's request leaves before the others' threads exist. Each outcome carries
    when its request left and its reply came, in ms since the barrier was set up."""
    if not hosts:
        return []
    barrier = threading.Barrier(len(hosts))
    t0 = time.monotonic()

    def one(host: str) -> dict:
        try:
            barrier.wait(timeout=barrier_s)
        except threading.BrokenBarrierError:
            pass  # a thread that was slow to start: go anyway, the skew is recorded
        sent = time.monotonic()
        outcome = call(host)
        return {"host": host, **outcome, "sent_at_ms": round(1000 * (sent - t0), 1),
                "replied_at_ms": round(1000 * (time.monotonic() - t0), 1)}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(pool.map(one, hosts))


def private_copy_reason(snapshot: dict, placement: str | None, snap_host: str, host: str) -> str | None:
    """Why `host` cannot read the copy a policy reads (its snapshot variant is not published:
    some pages are on the snapshot host's own file tier), or None."""
    if host == snap_host or not placement:
        return None
    variant = next((v for v in snapshot.get("variants") or [] if isinstance(v, dict)
                    and v.get("placement") == placement), None)
    if variant is None or variant.get("published") is not False:
        return None
    return (f"its {placement} copy is private to {snap_host} (published: false; cold pages on "
            f"{snap_host}'s {variant.get('cold_tier') or 'own'} tier)")


def refused(doc) -> dict | None:
    """The object that says why a host ran nothing: its error reply, or (no instance ok) its
    first started instance; None if something ran."""
    if is_error_reply(doc):
        return doc
    burst = as_burst(doc)
    started = [i for i in (burst or {}).get("instances") or [] if isinstance(i, dict) and i.get("busy") is not True]
    if started and all(i.get("ok") is not True for i in started):
        return started[0]
    return None


class Burst:
    def __init__(self, topo: Topology, plan: BurstPlan, run, leftover_grace_s: float):
        self.topo, self.plan, self.run = topo, plan, run
        self.leftover_grace_s = leftover_grace_s
        self.kept_before: dict[str, set[str]] = {}
        self.lacks_on: dict[str, dict[str, str | None]] = {}

    def tierctl(self, host: str, args: str, timeout_s: int):
        return tierctl.tierctl(self.run, self.topo, host, args, timeout_s)

    def instances_on(self, host: str) -> dict:
        """{operations, instances (ids alive and not there before the run), error, result}."""
        rc, doc, err = self.tierctl(host, "instances", INSTANCES_TIMEOUT_S)
        if rc != 0 or not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
            why = err or (f"{doc['error'].get('code')}: {doc['error'].get('message')}" if is_error_reply(doc)
                          else "no InstancesResult")
            return {"error": f"cannot list what runs on {host} (tierctl instances): {why}", "result": doc}
        alive = [i.get("id") for i in doc["instances"] if isinstance(i, dict) and i.get("alive") is not False]
        before = self.kept_before.get(host, set())
        return {"operations": number_or_none(doc.get("operations")),
                "instances": [i for i in alive if i not in before], "error": None, "result": doc}

    def record_kept_before(self) -> None:
        """Instances some earlier run kept alive are not this run's leftovers."""
        for out in on_every_host(self.plan.hosts, self.instances_on):
            if out["error"]:
                raise TestbedError(f"{out['error']} — a burst needs an agent that lists its instances "
                                   "(function.instances)")
            self.kept_before[out["host"]] = set(out["instances"])
            if out["operations"]:
                say(f"note: {out['host']} has {out['operations']} function operations in flight before the burst")

    def leftovers(self, host: str) -> dict:
        deadline = time.monotonic() + self.leftover_grace_s
        while True:
            out = self.instances_on(host)
            if out["error"] or not (out["operations"] or out["instances"]) or time.monotonic() >= deadline:
                return out
            time.sleep(0.5)

    def lacks(self, host: str, policy: str) -> str | None:
        if host not in self.lacks_on:
            try:
                self.lacks_on[host] = {p["name"]: p.get("missing")
                                       for p in matrix.agent_policies(self.run, self.topo, host)}
            except TestbedError as e:
                say(f"note: {e}")
                self.lacks_on[host] = {}
        return self.lacks_on[host].get(policy)

    def skip_after(self, host: str, policy: str, doc) -> str | None:
        """Skipped, not failed: what the host's typed policy list or result says it lacks."""
        why = refused(doc)
        if why is None:
            return None
        if why.get("missing") == "peer" and host == self.plan.snapshot_host:
            return f"{policy} serves the pages from the snapshot host to another host: not run on {host} itself"
        return matrix.skip_reason(self.topo, why, self.lacks(host, policy))

    def cell(self, sid: str, snapshot: dict, policy: str, placement: str | None, n: int) -> dict:
        t0 = time.monotonic()
        pre_skipped = {h: private_copy_reason(snapshot, placement, self.plan.snapshot_host, h)
                       for h in self.plan.hosts}
        timeout_s = restore_timeout_s(n)

        def restore_on(host: str) -> dict:
            rc, doc, err = self.tierctl(host, restore_command(sid, policy, n), timeout_s)
            burst = as_burst(doc)
            if burst is not None:
                every_ok = all(isinstance(i, dict) and i.get("ok") is True for i in burst["instances"])
                err = f"tierctl exited {rc} though every instance was ok" if rc != 0 and every_ok else ""
            elif is_error_reply(doc):
                err = ""  # the reply says what happened
            return {"tierctl_rc": rc, "timeout_s": timeout_s, "error": err or None, "result": doc}
        parts = {o["host"]: o for o in on_every_host([h for h in self.plan.hosts if not pre_skipped[h]], restore_on)}
        for host, part in parts.items():
            part["skipped"] = self.skip_after(host, policy, part["result"])
        left = {o["host"]: o for o in on_every_host(self.plan.hosts, self.leftovers)}
        for host, out in left.items():
            # Blamed on this cell only: a later cell fails for what it leaves itself.
            self.kept_before.setdefault(host, set()).update(out.get("instances") or [])
        hosts = []
        for h in self.plan.hosts:
            part = parts.get(h) or {"host": h, "skipped": pre_skipped[h]}
            hosts.append({**part, "leftovers": left[h]})
        return {"policy": policy, "instances": n, "snapshot_id": sid, "snapshot_host": self.plan.snapshot_host,
                "hosts": hosts, "seconds": round(time.monotonic() - t0, 1)}


def _progress(rows: list[dict]) -> str:
    r = next(x for x in rows if x["host"] == ALL_HOSTS)
    what = f"{r['policy']} x{r['instances']}"
    if r.get("skipped") and r["ok"]:
        return f"skip {what}: {r['skipped']}"
    if not r["ok"]:
        return f"FAIL {what} on {r.get('hosts', 0)} hosts: {r['error']}"
    return (f"ok   {what} on {r['hosts']} hosts: {r['ok_instances']} ok, first answer "
            f"{fmt_number(r['first_answer_ms'])} ms, last {fmt_number(r['last_answer_ms'])} ms, "
            f"{_mib(r['local_anonymous_bytes'])} MiB local anonymous")


def run_burst(topo: Topology, plan: BurstPlan, run=None, ensure_agents=None,
              leftover_grace_s: float = LEFTOVER_GRACE_S) -> int:
    """Every cell of the plan; `run` is launcher.run_in (tests pass a fake), `ensure_agents`
    agents.start."""
    run = run or launcher.run_in
    if ensure_agents is None:
        launcher.load_running(topo)
        ensure_agents = agents.start
    ensure_agents(topo)
    snap_host = plan.snapshot_host
    offered = {p["name"]: p for p in matrix.agent_policies(run, topo, snap_host)}
    if unknown := [p for p in plan.policies if p not in offered]:
        raise TestbedError(f"the agent on {snap_host} does not serve {', '.join(unknown)}; it lists: "
                           f"{', '.join(offered) or 'none'}")
    b = Burst(topo, plan, run, leftover_grace_s)
    b.record_kept_before()
    t0 = time.monotonic()
    results = {
        "kind": "burst", "topology": topo.name, "backend": topo.backend, "topology_file": str(topo.source or ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git": matrix.git_commit(),
        "function": plan.function, "policies": plan.policies, "instance_counts": plan.instance_counts,
        "hosts": plan.hosts, "snapshot_host": snap_host, "allow_busy": plan.allow_busy,
        "baseline": plan.baseline,
        "timeouts_s": {"snapshot": matrix.SNAPSHOT_TIMEOUT_S,
                       "restore": {str(n): restore_timeout_s(n) for n in plan.instance_counts},
                       "instances": INSTANCES_TIMEOUT_S, "leftover_grace": leftover_grace_s},
        "kept_before": {h: sorted(ids) for h, ids in b.kept_before.items()},   # alive before the run: not leftovers
        "snapshot": None, "cells": [], "cleanup": [], "seconds": 0.0,
    }
    say(f"burst: {plan.function}, policies {', '.join(plan.policies)} x instances "
        f"{', '.join(map(str, plan.instance_counts))} on {', '.join(plan.hosts)} at once; results in {plan.out_dir}")
    sid = f"{plan.function}-burst-{secrets.token_hex(3)}"
    ts = time.monotonic()
    say(f"{plan.function}: snapshot on {snap_host} (start, criu dump, ingest, profiling restore)")
    rc, snap, err = b.tierctl(snap_host, f"snapshot {shlex.quote(plan.function)} --id {shlex.quote(sid)}",
                              matrix.SNAPSHOT_TIMEOUT_S)
    results["snapshot"] = {"requested_id": sid, "host": snap_host, "tierctl_rc": rc, "error": err or None,
                           "seconds": round(time.monotonic() - ts, 1), "result": snap}
    cells = [(n, p) for n in plan.instance_counts for p in plan.policies]  # small bursts of every policy first
    if rc != 0 or snap is None:
        say(f"FAIL {plan.function}: snapshot: {err}")
        results["cells"] = [{"policy": p, "instances": n, "snapshot_id": None, "snapshot_host": snap_host,
                             "hosts": [], "error": f"snapshot failed: {err}"} for n, p in cells]
    else:
        sid = snap.get("id") or sid
        say(f"{plan.function}: snapshot {sid}: {snap.get('pages')} pages, "
            f"{len(snap.get('variants') or [])} copies ({time.monotonic() - ts:.0f} s)")
        for n, policy in cells:
            results["cells"].append(b.cell(sid, snap, policy, offered[policy].get("placement"), n))
            results["seconds"] = round(time.monotonic() - t0, 1)
            rows = write_outputs(plan.out_dir, results)
            say(_progress([r for r in rows if r["policy"] == policy and r["instances"] == n]))
        if not plan.keep:
            results["cleanup"] = matrix.delete_snapshot(run, topo, snap_host, snap, sid)
    results["seconds"] = round(time.monotonic() - t0, 1)
    rows = write_outputs(plan.out_dir, results)
    print(render_table(results, rows))
    png = matrix.try_plot(results, plan.out_dir / "burst.png", draw=plot)
    print(f"results: {plan.out_dir / 'results.json'}, burst.csv, instances.csv" + (", burst.png" if png else ""))
    return exit_status(rows)


def replot(results_dir: Path) -> int:
    """--plot DIR: the table and burst.png again from an earlier run's results.json."""
    results = load_results(results_dir)
    rows, _ = rows_of(results)
    print(render_table(results, rows))
    png = matrix.try_plot(results, (results_dir if results_dir.is_dir() else results_dir.parent) / "burst.png",
                          draw=plot)
    if png:
        print(png)
    return 0 if png else 1
