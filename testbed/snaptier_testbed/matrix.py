"""Restore matrix: every function x every restore policy, across two hosts of a running topology.

For each function the snapshot host's agent starts it, dumps it with CRIU, ingests it into the
tiered store and profiles it (`tierctl snapshot`); then, for each policy, the snapshot host asks
its agent to restore it on the restore host (`tierctl restore ID --policy P --host H`, forwarded
agent to agent). Every cell is recorded, failed ones included; nothing aborts the matrix.

Outputs (in --out, default run/<topology>/results/matrix-<UTC time>/): results.json (the raw
tierctl objects and the run's metadata), matrix.csv (one row per function x policy), matrix.png,
and a table on stdout. Exit status 0 iff every cell restored with a correct answer and an equal
state digest; 1 otherwise; 2 for usage errors (nothing contacted). Reference: docs/testbed.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import secrets
import statistics
import shlex
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from . import agents, launcher
from .launcher import TestbedError, say
from .state import REPO, state_dir_for
from .tierctl import tierctl
from .topology import MiB, Topology

CONTROL_SCHEMA = REPO / "docs" / "schema" / "control.schema.json"
WORKLOADS = REPO / "workloads"
SNAPSHOT_TIMEOUT_S = 900
RESTORE_TIMEOUT_S = 600
FAULTS_BASELINE = "lazy-cxl"
FIRST_RESPONSE_BASELINE = "criu-eager"
LAZY_BASELINE = "criu-lazy"
LAZY_SERVER_MECHANISM = "snaptier-lazy"   # a restore result's `mechanism` for the agent's lazy-pages server (schema enum)
FIXED_TIERS = ("cxl", "rdma")  # always a column; other tiers (local, file) when some result has them
TIER_ORDER = ("cxl", "rdma", "local", "file")


class UsageError(TestbedError):
    """Bad arguments: reported before any guest is contacted (exit 2)."""


# ------------------------------------------------------------------ arguments
def available_functions(root: Path = WORKLOADS) -> list[str]:
    """Function folders: directories of workloads/ with a function.toml, sorted by name."""
    return sorted(p.name for p in root.iterdir() if (p / "function.toml").is_file()) if root.is_dir() else []


def known_policies(schema: Path = CONTROL_SCHEMA) -> list[str]:
    """Every policy name an agent may offer: the control schema's PolicyName (the agent's own
    list is checked against it by its unit tests). For usage errors before any guest is contacted;
    what a run restores with is what the agent lists (agent_policies)."""
    try:
        return list(json.loads(schema.read_text())["$defs"]["PolicyName"]["enum"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the policy names from {schema}: {e}") from None


def parse_list(text: str | None, allowed: list[str] | tuple[str, ...], noun: str, flag: str) -> list[str]:
    """A comma-separated choice from `allowed` (all of them if text is None), duplicates dropped."""
    if text is None:
        return list(allowed)
    items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not items:
        raise UsageError(f"{flag}: empty list; known: {', '.join(allowed)}")
    unknown = [x for x in items if x not in allowed]
    if unknown:
        plural = ("ies" if noun.endswith("y") else "s") if len(unknown) > 1 else ""
        noun = noun[:-1] if plural == "ies" else noun
        raise UsageError(f"{flag}: unknown {noun}{plural} {', '.join(repr(x) for x in unknown)}; "
                         f"known: {', '.join(allowed) or 'none'}")
    return items


def pick_hosts(topo: Topology, snapshot_host: str | None, restore_host: str | None) -> tuple[str, str]:
    compute = [h.name for h in topo.hosts if h.role == "compute"]
    for flag, name in (("--snapshot-host", snapshot_host), ("--restore-host", restore_host)):
        if name is not None and name not in compute:
            known = {h.name for h in topo.hosts}
            what = "is a memory node" if name in known else f"is not a host of topology {topo.name!r}"
            raise UsageError(f"{flag} {name!r} {what}; compute hosts: {', '.join(compute) or 'none'}")
    snap = snapshot_host or (compute[0] if compute else None)
    if snap is None:
        raise UsageError(f"topology {topo.name!r} has no compute host")
    if restore_host is None and not any(h.role == "memory" for h in topo.hosts):
        # Without an RDMA pool the cold pages of `tiered` stay in the snapshot host's own file
        # tier (not shared), so host-to-host restores would measure only what CXL holds.
        say(f"topology {topo.name!r} has no RDMA pool: restoring on the snapshot host {snap} "
            "(give --restore-host for another host; restore-everywhere restores across hosts)")
        restore_host = snap
    if restore_host is None:
        others = [h for h in compute if h != snap]
        if not others:
            raise UsageError(f"topology {topo.name!r} has one compute host; give --restore-host {snap} "
                             "to restore on the snapshot host itself")
        # The second compute host, unless it was chosen as the snapshot host.
        restore_host = compute[1] if len(compute) > 1 and compute[1] != snap else others[0]
    if restore_host != snap:
        link = topo.link_of(snap)
        if link is None or restore_host not in link.hosts:
            raise UsageError(f"{restore_host} is not on a link with {snap}: the agent of {snap} "
                             "cannot forward the restore to it")
    return snap, restore_host


# ------------------------------------------------------------------ rows
def number_or_none(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def row_of(cell: dict) -> dict:
    """One CSV/table row from one recorded cell (its raw restore object plus what the testbed saw)."""
    r = cell.get("restore") if isinstance(cell.get("restore"), dict) else {}
    faults = r.get("faults") if isinstance(r.get("faults"), dict) else {}
    per_tier = faults.get("per_tier") if isinstance(faults.get("per_tier"), dict) else {}
    moved = r.get("bytes_moved_per_tier") if isinstance(r.get("bytes_moved_per_tier"), dict) else {}
    errors = []
    if cell.get("error"):
        errors.append(cell["error"])
    if cell.get("skipped"):
        r = {}
    elif r:
        if r.get("ok") is not True:
            errors.append(r.get("error") or "restore failed (no error message)")
        elif r.get("error"):
            errors.append(str(r["error"]))
        problems = r.get("problems") or []
        if problems:
            errors.append("; ".join(str(p) for p in problems))
        if r.get("ok") is True and r.get("answer_ok") is not True and not problems:
            errors.append("wrong answer" if r.get("answer_ok") is False else "answer not checked")
        if r.get("ok") is True and r.get("digest_ok") is not True:
            errors.append("state digest differs" if r.get("digest_ok") is False else "state digest not checked")
        if r.get("ok") is True and r.get("mechanism") == LAZY_SERVER_MECHANISM and r.get("lazy_pages") == 0 \
                and not r.get("pages_mapped_in_place"):
            # Seen once: answer and digest right, but CRIU restored every page itself. The
            # cell would report criu-eager's work under this policy's name.
            errors.append("no page was left to the agent's lazy-pages server (lazy_pages 0, none mapped in place): "
                          "CRIU restored every page itself, so this cell does not measure its policy")
        want = cell.get("restore_host")
        if r.get("host") and want and r["host"] != want:
            errors.append(f"restored on {r['host']}, not on {want}: the request was not forwarded")
    elif not errors:
        errors.append("no restore result")
    skipped = cell.get("skipped")
    ok = bool(skipped) or (not errors and r.get("ok") is True and r.get("answer_ok") is True
                           and r.get("digest_ok") is True)
    row = {
        "function": cell.get("function"), "policy": cell.get("policy"), "snapshot_id": cell.get("snapshot_id"),
        "snapshot_host": cell.get("snapshot_host"), "restore_host": cell.get("restore_host"),
        "ok": ok, "skipped": skipped or None,
        "restore_ms": number_or_none(r.get("restore_ms")), "first_response_ms": number_or_none(r.get("first_response_ms")),
        "warm_invoke_ms": number_or_none(r.get("warm_invoke_ms")), "bare_restore_ms": number_or_none(r.get("bare_restore_ms")),
        "faults_total": number_or_none(faults.get("total")), "faults_read": number_or_none(faults.get("read")),
        "faults_write": number_or_none(faults.get("write")), "faults_zero": number_or_none(faults.get("zero")),
    }
    row.update(repeated_times(cell, row))
    for tier, n in per_tier.items():
        row[f"faults_{tier}"] = number_or_none(n)
    for tier, n in moved.items():
        row[f"bytes_{tier}"] = number_or_none(n)
    row.update({
        "pages_prefetched": number_or_none(r.get("pages_prefetched")), "pages_background": number_or_none(r.get("pages_background")),
        "zero_pages": number_or_none(r.get("zero_pages")), "local_memory_bytes": number_or_none(r.get("local_memory_bytes")),
        "local_anonymous_bytes": number_or_none(r.get("local_anonymous_bytes")),
        "pages_mapped_in_place": number_or_none(r.get("pages_mapped_in_place")),
        "cow_copies_after_first_response": number_or_none(r.get("cow_copies_after_first_response")),
        "answer_ok": r.get("answer_ok") if isinstance(r.get("answer_ok"), bool) else None,
        "digest_ok": r.get("digest_ok") if isinstance(r.get("digest_ok"), bool) else None,
        "error": " | ".join(dict.fromkeys(str(e) for e in errors)) or None,
    })
    return row


def repeated_times(cell: dict, row: dict) -> dict:
    """A repeated cell's times are the medians of its repetitions; its first response's range beside."""
    repeats = cell.get("repeats") if isinstance(cell.get("repeats"), list) else []
    out = {"repeats": len(repeats) or 1, "first_response_ms_min": row["first_response_ms"],
           "first_response_ms_max": row["first_response_ms"]}
    if not repeats:
        return out
    for key in REPEATED:
        values = [number_or_none(r.get(key)) for r in repeats if isinstance(r, dict)]
        values = [v for v in values if v is not None]
        out[key] = statistics.median(values) if values else None
        if key == "first_response_ms" and values:
            out["first_response_ms_min"], out["first_response_ms_max"] = min(values), max(values)
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """faults vs lazy-cxl of the same function in percent; first response as a speedup over
    criu-eager and criu-lazy of the same function (their first response / this one) and as a
    ratio to the function's limit (limits()). None when a cell failed or has no number, or the
    baseline is 0."""
    by = {(r["function"], r["policy"]): r for r in rows}
    limit_of = limits(rows)

    def baseline(r: dict, policy: str, metric: str):
        base = by.get((r["function"], policy))
        return base.get(metric) if base and base["ok"] and not base["skipped"] else None

    for r in rows:
        ran = r["ok"] and not r["skipped"]
        faults, base_faults = r.get("faults_total"), baseline(r, FAULTS_BASELINE, "faults_total")
        r["faults_vs_lazy_cxl_pct"] = (round(100.0 * faults / base_faults, 1)
                                       if ran and faults is not None and base_faults else None)
        first = r.get("first_response_ms")
        for key, policy in (("speedup_vs_criu_eager", FIRST_RESPONSE_BASELINE), ("speedup_vs_criu_lazy", LAZY_BASELINE)):
            base = baseline(r, policy, "first_response_ms")
            r[key] = round(base / first, 3) if ran and first and base else None
        limit = limit_of.get(r["function"], {}).get("limit_ms")
        r["limit_ms"] = limit
        r["first_response_vs_limit"] = round(first / limit, 3) if ran and first is not None and limit else None
    return rows


def limits(rows: list[dict]) -> dict[str, dict]:
    """Per function, the limit of its first response (docs/restore-policies.md, "The limit"):
    the median bare restore over its successful cells (the same measurement in every cell) plus
    the warm invocation of criu-eager, whose instance has every page in local memory and no
    userfaultfd (the median over the cells where criu-eager did not run). A function missing
    either has no limit."""
    out: dict[str, dict] = {}
    for fn in dict.fromkeys(r["function"] for r in rows):
        good = [r for r in rows if r["function"] == fn and r["ok"] and not r["skipped"]]
        bare = [r["bare_restore_ms"] for r in good if r.get("bare_restore_ms") is not None]
        eager = [r["warm_invoke_ms"] for r in good
                 if r["policy"] == FIRST_RESPONSE_BASELINE and r.get("warm_invoke_ms") is not None]
        warm = eager or [r["warm_invoke_ms"] for r in good if r.get("warm_invoke_ms") is not None]
        if bare and warm:
            b, w = statistics.median(bare), statistics.median(warm)
            out[fn] = {"bare_restore_ms": round(b, 3), "warm_invoke_ms": round(w, 3), "limit_ms": round(b + w, 3),
                       "warm_from": FIRST_RESPONSE_BASELINE if eager else "median of the cells"}
    return out


def geo_mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 3) if values else None


def summary(rows: list[dict]) -> dict:
    """Per policy over the functions: geo-means of first response / limit and of the speedups,
    the worst ratio to the limit; per function: its limit and the policy that came closest;
    and the same geo-means over each function's closest policy ("best")."""
    functions = limits(rows)
    policies = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy and r["ok"] and not r["skipped"]]
        vs = [r["first_response_vs_limit"] for r in mine if r.get("first_response_vs_limit") is not None]
        policies[policy] = {
            "functions": len(mine), "vs_limit_geo_mean": geo_mean(vs), "vs_limit_max": max(vs) if vs else None,
            "speedup_vs_criu_eager_geo_mean": geo_mean([r.get("speedup_vs_criu_eager") for r in mine]),
            "speedup_vs_criu_lazy_geo_mean": geo_mean([r.get("speedup_vs_criu_lazy") for r in mine]),
        }
    best = []
    for fn, lim in functions.items():
        ranked = sorted((r for r in rows if r["function"] == fn and r.get("first_response_vs_limit") is not None),
                        key=lambda r: r["first_response_vs_limit"])
        if ranked:
            lim.update({"best_policy": ranked[0]["policy"], "best_vs_limit": ranked[0]["first_response_vs_limit"]})
            best.append(ranked[0])
    overall = {"functions": len(best), "vs_limit_geo_mean": geo_mean([r["first_response_vs_limit"] for r in best]),
               "vs_limit_max": max((r["first_response_vs_limit"] for r in best), default=None),
               "speedup_vs_criu_eager_geo_mean": geo_mean([r.get("speedup_vs_criu_eager") for r in best]),
               "speedup_vs_criu_lazy_geo_mean": geo_mean([r.get("speedup_vs_criu_lazy") for r in best])}
    return {"functions": functions, "policies": policies, "best": overall}


def rows_of(results: dict) -> list[dict]:
    return add_ratios([row_of(c) for c in results.get("cells", [])])


def tier_columns(rows: list[dict]) -> list[str]:
    seen = {k.split("_", 1)[1] for r in rows for k in r if k.startswith(("faults_", "bytes_"))} - {
        "total", "read", "write", "zero", "vs_lazy_cxl_pct"}
    extra = [t for t in TIER_ORDER if t in seen and t not in FIXED_TIERS] + sorted(seen - set(TIER_ORDER))
    return list(FIXED_TIERS) + extra


def csv_columns(rows: list[dict]) -> list[str]:
    tiers = tier_columns(rows)
    return (["function", "policy", "snapshot_id", "snapshot_host", "restore_host", "ok", "skipped",
             "restore_ms", "first_response_ms", "first_response_ms_min", "first_response_ms_max", "repeats",
             "warm_invoke_ms", "bare_restore_ms", "limit_ms",
             "first_response_vs_limit", "speedup_vs_criu_eager", "speedup_vs_criu_lazy", "faults_total", "faults_read", "faults_write", "faults_zero"]
            + [f"faults_{t}" for t in tiers] + [f"bytes_{t}" for t in tiers]
            + ["pages_prefetched", "pages_background", "zero_pages", "local_memory_bytes",
               "local_anonymous_bytes", "pages_mapped_in_place", "cow_copies_after_first_response",
               "faults_vs_lazy_cxl_pct", "answer_ok", "digest_ok", "error"])


def write_csv(path: Path, rows: list[dict]) -> None:
    write_csv_rows(path, csv_columns(rows), rows)


def write_csv_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Empty for unknown values, true/false for booleans (what spreadsheets and pandas read back)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else (str(r[c]).lower() if isinstance(r.get(c), bool) else r[c])
                        for c in columns])


def fmt_number(value, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(round(value), "d") if spec == "d" else format(value, spec)


def fmt_pct(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def render_table(results: dict, rows: list[dict]) -> str:
    """A terminal table: one line per function x policy, a blank line between functions, the
    failures spelled out below it, and a closing 'N passed, N failed' line."""
    tiers = tier_columns(rows)
    fw = max([8] + [len(str(r["function"])) for r in rows])
    pw = max([6] + [len(str(r["policy"])) for r in rows])
    head = (f"  {'function':{fw}} {'policy':{pw}} {'result':6} {'restore ms':>10} {'1st resp ms':>11} {'faults':>7}"
            + "".join(f" {t + ' flt':>8}" for t in tiers)
            + f" {'moved MiB':>9} {'local MiB':>9} {'faults vs ' + FAULTS_BASELINE:>18}"
            f" {'limit ms':>8} {'vs limit':>8} {'x eager':>7} {'x lazy':>7}")
    hosts = results.get("hosts", {})
    clock = ("native hosts: real CPU and DRAM, CXL at DRAM speed" if results.get("backend") == "native"
             else "emulated hardware: compare ratios, not absolutes")
    out = [f"restore matrix on topology {results.get('topology')}: snapshots on {hosts.get('snapshot')}, "
           f"restored on {hosts.get('restore')} ({clock}); x eager, x lazy: speedup of the first response over "
           f"{FIRST_RESPONSE_BASELINE}, {LAZY_BASELINE}", head]
    last = None
    for r in rows:
        if last is not None and r["function"] != last:
            out.append("")
        last = r["function"]
        moved = [r.get(f"bytes_{t}") for t in tier_columns([r]) if r.get(f"bytes_{t}") is not None]
        out.append(
            f"  {r['function']:{fw}} {r['policy']:{pw}} {'skip' if r['skipped'] else 'ok' if r['ok'] else 'FAIL':6}"
            f" {fmt_number(r['restore_ms']):>10}"
            f" {fmt_number(r['first_response_ms']):>11} {fmt_number(r['faults_total'], 'd'):>7}"
            + "".join(f" {fmt_number(r.get(f'faults_{t}'), 'd'):>8}" for t in tiers)
            + f" {fmt_number(sum(moved) / MiB if moved else None):>9}"
            f" {fmt_number(r['local_memory_bytes'] / MiB if r['local_memory_bytes'] is not None else None):>9}"
            f" {fmt_pct(r['faults_vs_lazy_cxl_pct']):>18} {fmt_number(r['limit_ms']):>8}"
            f" {fmt_ratio(r['first_response_vs_limit']):>8} {fmt_ratio(r['speedup_vs_criu_eager']):>7}"
            f" {fmt_ratio(r['speedup_vs_criu_lazy']):>7}")
    failed = [r for r in rows if not r["ok"]]
    skipped = [r for r in rows if r["skipped"]]
    if failed:
        out += ["", "  failures:"]
        out += [f"    {r['function']} {r['policy']}: {r['error']}" for r in failed]
    if skipped:
        out += ["", "  skipped (not failed):"]
        out += [f"    {r['function']} {r['policy']}: {r['skipped']}"
                for r in {(r["policy"], r["skipped"]): r for r in skipped}.values()]
    out += render_summary(summary(rows))
    out.append(f"matrix: {len(rows) - len(failed) - len(skipped)} passed, {len(failed)} failed"
               + (f", {len(skipped)} skipped" if skipped else ""))
    return "\n".join(out)


def fmt_ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_summary(doc: dict) -> list[str]:
    """First response against the limit (bare restore + warm invocation) and the baselines,
    geo-means over the functions, per policy and for each function's closest policy."""
    if not any(p["vs_limit_geo_mean"] or p["speedup_vs_criu_eager_geo_mean"] for p in doc["policies"].values()):
        return []
    pw = max([6] + [len(p) for p in doc["policies"]])
    out = ["", "  first response against the limit (bare restore + warm invocation) and the baselines, "
               "geo-means over the functions:",
           f"  {'policy':{pw}} {'functions':>9} {'vs limit':>8} {'worst':>7} {'x ' + FIRST_RESPONSE_BASELINE:>12}"
           f" {'x ' + LAZY_BASELINE:>11}"]
    rows = list(doc["policies"].items()) + [("best", doc["best"])]
    for name, p in rows:
        out.append(f"  {name:{pw}} {p['functions']:>9} {fmt_ratio(p['vs_limit_geo_mean']):>8}"
                   f" {fmt_ratio(p['vs_limit_max']):>7} {fmt_ratio(p['speedup_vs_criu_eager_geo_mean']):>12}"
                   f" {fmt_ratio(p['speedup_vs_criu_lazy_geo_mean']):>11}")
    closest = [f"{fn} {lim['best_policy']} {lim['best_vs_limit']:.2f}x of {lim['limit_ms']:.1f} ms"
               for fn, lim in doc["functions"].items() if lim.get("best_policy")]
    if closest:
        out.append("  best: each function's policy closest to its limit: " + "; ".join(closest))
    return out


def exit_status(rows: list[dict]) -> int:
    return 0 if rows and all(r["ok"] for r in rows) else 1


# ------------------------------------------------------------------ outputs
def git_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def write_outputs(out_dir: Path, results: dict) -> list[dict]:
    """results.json (atomically) and matrix.csv; returns the rows."""
    rows = rows_of(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", {**results, "rows": rows, "limit": summary(rows)})
    write_csv(out_dir / "matrix.csv", rows)
    return rows


def write_json_atomic(path: Path, doc: dict) -> None:
    """A reader (or an interrupted run) never sees half a file: written aside, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def load_results(results_dir: Path, kind: str = "matrix") -> dict:
    path = results_dir / "results.json" if results_dir.is_dir() else results_dir
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"no {kind} results at {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"{path} is not a {kind} results.json: {e}") from None


def plot(results: dict, png: Path) -> Path:
    """Grouped bars per function, one bar per policy: first response (log) and faults (log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(results)
    functions = list(dict.fromkeys(r["function"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["function"], r["policy"]): r for r in rows}
    with_limit = any(r.get("first_response_vs_limit") is not None for r in rows)
    panels = [("first_response_ms", "first response [ms] (log)", True)]
    if with_limit:
        panels.append(("first_response_vs_limit", "first response / limit (log)\n(bare restore + warm invoke)", False))
    panels.append(("faults_total", "page faults (log)", True))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(functions) + 3), 3.75 * len(panels)),
                             sharex=True)
    width = 0.8 / max(1, len(policies))
    # One colour per policy: tab10's ten, then tab20's lighter shades of them.
    tab20 = plt.get_cmap("tab20").colors
    colors = list(tab20[0::2]) + list(tab20[1::2])
    for ax, (metric, label, log) in zip(axes, panels):
        for i, policy in enumerate(policies):
            xs, ys = [], []
            for j, fn in enumerate(functions):
                r = by.get((fn, policy))
                v = r.get(metric) if r and r["ok"] and not r["skipped"] else None
                if v is not None and v > 0:  # a log axis has no place for 0 or failed cells
                    xs.append(j + i * width)
                    ys.append(v)
                elif r and (r["skipped"] or not r["ok"]):
                    ax.text(j + i * width, 0.02, "skipped" if r["skipped"] else "failed",
                            transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom", fontsize=7,
                            color="gray" if r["skipped"] else "red")
            ax.bar(xs, ys, width, label=policy, color=colors[i % len(colors)])
        ax.set_yscale("log")
        if not log:  # a ratio: 1 is the limit
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", which="major", alpha=0.3)
    axes[-1].set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(functions))])
    axes[-1].set_xticklabels(functions)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, title="policy", title_fontsize=8)
    hosts = results.get("hosts", {})
    axes[0].set_title(f"snaptier restore matrix, topology {results.get('topology')}: "
                      f"{hosts.get('snapshot')} -> {hosts.get('restore')} "
                      f"({'native: real CPU and DRAM' if results.get('backend') == 'native' else 'emulated: compare ratios'})",
                      fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def try_plot(results: dict, png: Path, draw=None) -> Path | None:
    """`draw(results, png)` (default: the matrix's plot), or None with a note if it cannot."""
    try:
        return (draw or plot)(results, png)
    except ImportError:
        say(f"matplotlib is missing: no {png.name} (apt-get install python3-matplotlib)")
    except Exception as e:  # a plot must never cost the measurements
        say(f"could not draw {png.name}: {e}")
    return None


# ------------------------------------------------------------------ the matrix
def _cell(function: str, policy: str, snapshot_id: str | None, snap_host: str, restore_host: str,
          restore: dict | None = None, error: str | None = None, rc: int | None = None, seconds: float = 0.0,
          skipped: str | None = None) -> dict:
    return {"function": function, "policy": policy, "snapshot_id": snapshot_id, "snapshot_host": snap_host,
            "restore_host": restore_host, "tierctl_rc": rc, "seconds": round(seconds, 1),
            "error": error, "restore": restore, "skipped": skipped}


def delete_snapshot(run, topo: Topology, host: str, snap: dict, sid: str) -> list[dict]:
    """Deletes the snapshot `sid` and its placement copies (`snap`: its tierctl snapshot object)
    on `host`, copies first so no moment leaves a copy without its snapshot; one record per id."""
    ids = [v.get("id") for v in snap.get("variants") or [] if isinstance(v, dict) and v.get("id")]
    records = []
    for vid in dict.fromkeys([i for i in ids if i != sid] + [sid]):
        rc, _, err = tierctl(run, topo, host, f"delete {shlex.quote(vid)}", 120)
        records.append({"id": vid, "ok": rc == 0, "error": err or None})
        if rc != 0:
            say(f"note: could not delete {vid} on {host}: {err}")
    return records


def agent_policies(run, topo: Topology, host: str) -> list[dict]:
    """The restore policies `host`'s agent serves, in its order, each with what that host lacks
    for it (`missing`): tierctl status, "policies"."""
    rc, doc, err = tierctl(run, topo, host, "status", 60)
    policies = doc.get("policies") if isinstance(doc, dict) else None
    if rc != 0 or not isinstance(policies, list):
        raise TestbedError(f"the agent on {host} lists no restore policies: "
                           f"{err or 'its status has no policies (an agent without a function service?)'}")
    return [p for p in policies if isinstance(p, dict) and isinstance(p.get("name"), str)]


def missing_tiers(topo: Topology) -> dict[str, str]:
    """Tiers no host of this topology can have, and why."""
    if any(h.role == "memory" for h in topo.hosts):
        return {}
    return {"rdma": "no memory node in this topology (no RDMA pool)"}


def refused_or_failed(doc: dict | None) -> bool:
    """The agent refused the restore ({"error": {code, message}}) or ran it and it failed."""
    if not isinstance(doc, dict):
        return False
    return isinstance(doc.get("error"), dict) or doc.get("ok") is False


def skip_reason(topo: Topology, doc: dict | None, lacks: str | None) -> str | None:
    """A cell is skipped, not failed, when the agent refused it (or it failed) and the restore
    host's policy list says it lacks something this topology cannot have (`lacks`: that policy's
    typed `missing`): a tier no host of it has, or a CXL tier that maps in place."""
    if not lacks or not refused_or_failed(doc):
        return None
    error = doc.get("error")
    message = str(error.get("message", "")) if isinstance(error, dict) else str(error or "")
    if lacks == "in_place":  # a policy that maps pages in place (trenv) on a devdax CXL tier
        return f"this topology's CXL tier cannot map pages in place: {message}"
    why = missing_tiers(topo).get(lacks)
    return f"{why}: {message}" if why else None


def private_placements(snap: dict) -> set[str]:
    """The placements whose copy of a snapshot only its own host can read (`published` false in
    the snapshot's variants: some of its pages are on a tier other hosts do not share)."""
    return {v["placement"] for v in snap.get("variants") or []
            if isinstance(v, dict) and isinstance(v.get("placement"), str) and v.get("published") is False}


def needs_peer(doc: dict | None) -> bool:
    """The restore failed on the snapshot host itself because its mechanism serves pages from
    the snapshot host to another one (the result's typed `missing`)."""
    return isinstance(doc, dict) and doc.get("missing") == "peer"


def peer_for(topo: Topology, host: str) -> str | None:
    link = topo.link_of(host)
    return next((h for h in (link.hosts if link else ()) if h != host and topo.host(h).role == "compute"), None)


def _progress(row: dict) -> str:
    if row["skipped"]:
        return f"skip {row['function']} {row['policy']}: {row['skipped']}"
    if row["ok"]:
        return (f"ok   {row['function']} {row['policy']}: restore {fmt_number(row['restore_ms'])} ms, first response "
                f"{fmt_number(row['first_response_ms'])} ms, {fmt_number(row['faults_total'], 'd')} faults")
    return f"FAIL {row['function']} {row['policy']}: {row['error']}"


def restore_cell(run, topo: Topology, fn: str, policy: str, sid: str, snap_host: str, restore_host: str,
                 measure_limit: bool, lacks) -> dict:
    """One restore of `sid` with `policy`, asked of the snapshot host's agent, as a recorded cell."""
    tc = time.monotonic()
    forward = f" --host {shlex.quote(restore_host)}" if restore_host != snap_host else ""
    limit = " --limit" if measure_limit else ""
    target = restore_host
    rc, doc, err = tierctl(run, topo, snap_host,
                           f"restore {shlex.quote(sid)} --policy {shlex.quote(policy)}{forward}{limit}", RESTORE_TIMEOUT_S)
    peer = peer_for(topo, snap_host) if restore_host == snap_host and needs_peer(doc) else None
    if peer:
        # The mechanism restores from another host's agent (criu-remote): run it on a peer.
        target = peer
        rc, doc, err = tierctl(run, topo, snap_host,
                               f"restore {shlex.quote(sid)} --policy {shlex.quote(policy)} "
                               f"--host {shlex.quote(peer)}{limit}", RESTORE_TIMEOUT_S)
    if doc is not None and rc != 0 and doc.get("ok") is True:
        err = err or f"tierctl exited {rc}"
    elif doc is not None:
        err = ""  # the object says what happened (ok false + error)
    return _cell(fn, policy, sid, snap_host, target, restore=doc, error=err or None, rc=rc,
                 seconds=time.monotonic() - tc, skipped=skip_reason(topo, doc, lacks(target, policy, doc)))


REPEATED = ("first_response_ms", "restore_ms", "warm_invoke_ms", "bare_restore_ms")


def combine_repeats(cells: list[dict]) -> dict:
    """The repetitions of one cell as one: the first that failed or was skipped, else the one
    with the median first response; `repeats` keeps every repetition's times."""
    if len(cells) == 1:
        return cells[0]
    bad = next((c for c in cells if c.get("skipped") or not row_of(c)["ok"]), None)
    if bad is not None:
        chosen = bad
    else:
        chosen = sorted(cells, key=lambda c: c["restore"]["first_response_ms"])[(len(cells) - 1) // 2]
    times = [{k: (c.get("restore") or {}).get(k) for k in REPEATED} for c in cells]
    return {**chosen, "repeats": times, "seconds": round(sum(c.get("seconds", 0.0) for c in cells), 1)}


def run_matrix(topo: Topology, functions: list[str], policies: list[str] | None, snap_host: str, restore_host: str,
               out_dir: Path, keep: bool = False, run=None, ensure_agents=None, measure_limit: bool = True,
               repeat: int = 1) -> int:
    """Runs every cell; `run` is launcher.run_in (tests pass a fake), `ensure_agents` agents.start.
    `policies` None: every policy the snapshot host's agent lists, in its order."""
    run = run or launcher.run_in
    if ensure_agents is None:
        launcher.load_running(topo)
        ensure_agents = agents.start
    ensure_agents(topo)
    listed = agent_policies(run, topo, snap_host)
    offered = [p["name"] for p in listed]
    placement_of = {p["name"]: p.get("placement") for p in listed}
    lacks_on: dict[str, dict[str, str | None]] = {}

    def lacks(host: str, policy: str, doc: dict | None) -> str | None:
        """What `host` lacks for `policy`, asked of its agent once, and only for a cell that did not run."""
        if not refused_or_failed(doc):
            return None
        if host not in lacks_on:
            try:
                lacks_on[host] = {p["name"]: p.get("missing") for p in agent_policies(run, topo, host)}
            except TestbedError as e:
                say(f"note: {e}")
                lacks_on[host] = {}
        return lacks_on[host].get(policy)

    if policies is None:
        policies = offered
    elif unknown := [p for p in policies if p not in offered]:
        raise TestbedError(f"the agent on {snap_host} does not serve {', '.join(unknown)}; it lists: "
                           f"{', '.join(offered) or 'none'}")
    t0 = time.monotonic()
    tag = secrets.token_hex(3)
    results = {
        "topology": topo.name, "backend": topo.backend, "topology_file": str(topo.source or ""),
        "hosts": {"snapshot": snap_host, "restore": restore_host,
                  "all": [{"name": h.name, "role": h.role,
                           "data_address": str(topo.link_of(h.name).address_of(h.name).ip)
                           if topo.link_of(h.name) else None} for h in topo.hosts]},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(), "functions": functions, "policies": policies,
        "timeouts_s": {"snapshot": SNAPSHOT_TIMEOUT_S, "restore": RESTORE_TIMEOUT_S}, "measure_limit": measure_limit, "repeat": repeat,
        "snapshots": {}, "cells": [], "cleanup": [], "seconds": 0.0,
    }
    say(f"restore matrix: {len(functions)} functions x {len(policies)} policies, snapshots on {snap_host}, "
        f"restores on {restore_host}; results in {out_dir}")
    for fn in functions:
        sid = f"{fn}-{tag}"
        ts = time.monotonic()
        say(f"{fn}: snapshot on {snap_host} (start, criu dump, ingest, profiling restore)")
        rc, snap, err = tierctl(run, topo, snap_host, f"snapshot {shlex.quote(fn)} --id {shlex.quote(sid)}",
                                SNAPSHOT_TIMEOUT_S)
        results["snapshots"][fn] = {"requested_id": sid, "tierctl_rc": rc, "seconds": round(time.monotonic() - ts, 1),
                                    "error": err or None, "result": snap}
        if rc != 0 or snap is None:
            say(f"FAIL {fn}: snapshot: {err}")
            for policy in policies:
                results["cells"].append(_cell(fn, policy, None, snap_host, restore_host,
                                              error=f"snapshot failed: {err}", rc=rc))
            write_outputs(out_dir, results)
            continue
        sid = snap.get("id") or sid
        prof = snap.get("profile") or {}
        say(f"{fn}: snapshot {sid}: {snap.get('pages')} pages, {prof.get('hot')} hot / {prof.get('cold')} cold, "
            f"{len(snap.get('variants') or [])} variants ({time.monotonic() - ts:.0f} s)")
        private = private_placements(snap)
        # Repetitions interleave the policies, so a load that drifts during the run touches all alike.
        reps: dict[str, list[dict]] = {p: [] for p in policies}
        done = list(results["cells"])
        for rep in range(repeat):
            for policy in policies:
                last = reps[policy][-1] if reps[policy] else None
                if last is not None and (last.get("skipped") or not row_of(last)["ok"]):
                    continue  # a failed or skipped cell is not repeated
                # A copy only the snapshot host holds (pages in its DRAM or on its disk) restores there.
                host = snap_host if placement_of.get(policy) in private else restore_host
                cell = restore_cell(run, topo, fn, policy, sid, snap_host, host, measure_limit, lacks)
                reps[policy].append(cell)
                say((f"[{rep + 1}/{repeat}] " if repeat > 1 else "") + _progress(row_of(cell)))
                results["cells"] = done + [combine_repeats(c) for c in reps.values() if c]
                results["seconds"] = round(time.monotonic() - t0, 1)
                write_outputs(out_dir, results)
        if not keep:
            results["cleanup"] += delete_snapshot(run, topo, snap_host, snap, sid)
    results["seconds"] = round(time.monotonic() - t0, 1)
    rows = write_outputs(out_dir, results)
    print(render_table(results, rows))
    png = try_plot(results, out_dir / "matrix.png")
    print(f"results: {out_dir / 'results.json'}, matrix.csv" + (", matrix.png" if png else ""))
    return exit_status(rows)


# ------------------------------------------------------------------ command line
def default_out_dir(topo: Topology, kind: str = "matrix") -> Path:
    """run/<topology>/results/<kind>-<UTC time>/ (tb matrix, tb burst)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return state_dir_for(topo.name) / "results" / f"{kind}-{stamp}"


def add_arguments(m: argparse.ArgumentParser) -> None:
    """`tb matrix`'s options, on the subparser testbed/tb's one parser (cli.py) gives it."""
    m.add_argument("--functions", help="comma-separated (default: every folder of workloads/ with function.toml)")
    m.add_argument("--policies", help="comma-separated (default: every policy the snapshot host's agent lists, "
                                      "in its order; `tierctl policies`)")
    m.add_argument("--snapshot-host", help="where functions are snapshotted (default: the first compute host)")
    m.add_argument("--restore-host", help="where they are restored (default: the second compute host; the snapshot "
                                          "host itself where the topology has no RDMA pool)")
    m.add_argument("--out", help="results directory (default: run/<topology>/results/matrix-<UTC time>/)")
    m.add_argument("--keep", action="store_true", help="keep the snapshots in the store afterwards")
    m.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="restore every cell N times, the policies interleaved; a cell's numbers are the medians "
                        "(default 1)")
    m.add_argument("--no-limit", action="store_true",
                   help="no bare restore after each cell (no bare_restore_ms, so no ratio to the limit)")
    m.add_argument("--plot", metavar="RESULTS_DIR",
                   help="only draw RESULTS_DIR/matrix.png (and print the table) from an earlier run")


def run_from_args(args, topo: Topology, run=None, ensure_agents=None) -> int:
    """`testbed/tb [-t TOPOLOGY] matrix ...`; usage errors (UsageError) come before any guest is contacted."""
    if args.plot:
        results = load_results(Path(args.plot))
        rows = rows_of(results)
        print(render_table(results, rows))
        png = try_plot(results, (Path(args.plot) if Path(args.plot).is_dir() else Path(args.plot).parent)
                       / "matrix.png")
        if png:
            print(png)
        return 0 if png else 1
    functions = parse_list(args.functions, available_functions(), "function", "--functions")
    policies = parse_list(args.policies, known_policies(), "policy", "--policies") if args.policies else None
    snap_host, restore_host = pick_hosts(topo, args.snapshot_host, args.restore_host)
    if not 1 <= args.repeat <= 50:
        raise UsageError(f"--repeat {args.repeat}: must be 1..50")
    out_dir = Path(args.out) if args.out else default_out_dir(topo)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    return run_matrix(topo, functions, policies, snap_host, restore_host, out_dir, keep=args.keep,
                      run=run, ensure_agents=ensure_agents, measure_limit=not args.no_limit, repeat=args.repeat)


def main(argv: list[str], run=None, ensure_agents=None) -> int:
    """testbed/tb's own parser and error handling, with the guest runner replaceable (tests)."""
    from .cli import main as tb_main
    return tb_main(argv, matrix_hooks={"run": run, "ensure_agents": ensure_agents})
