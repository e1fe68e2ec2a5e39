#!/usr/bin/env python3
"""The table of one `tests/zdtm/zdtm.sh` run: test x daemon per flavor, and the gate.

    report.py OUT_DIR            prints the table, writes OUT_DIR/results.{json,csv}

OUT_DIR holds one directory per run, FLAVOR-DAEMON (h-criu, ns-snaptier-none, ...), each with
zdtm's TAP report in report/ and zdtm's log (zdtm.log, which names the stage a test failed
at). Exit status 1 when a snaptier daemon fails a test that CRIU's daemon passes in the same
flavor, or when a run left no report (it crashed or timed out). Not counted against the agent,
but listed: tests CRIU's daemon fails too, and failures before any lazy-pages daemon ran (at
the test's start or at `criu dump`: the daemon serves the restore only).
"""
from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "criu"
TAP_LINE = re.compile(r"^(?P<not>not )?ok \d+ - (?P<name>\S+)(?: # (?P<directive>.*))?$")
FAIL_LINE = re.compile(r"Test (?P<name>\S+) FAIL at (?P<stage>.+?)[ #]*$")
# Stages at which no lazy-pages daemon has run yet: the test's own start, and the dump.
BEFORE_RESTORE = ("CRIU dump", "CRIU pre-dump", "['make'", "start:")


@dataclass
class Run:
    flavor: str
    daemon: str
    outcomes: dict[str, str] = field(default_factory=dict)  # test -> pass | fail | skip: REASON
    problem: str | None = None  # why there are no outcomes
    as_root: str | None = None
    served_by_snaptier: int = 0  # lazy-pages daemons the wrapper started (0 for criu's)
    fail_stage: dict[str, str] = field(default_factory=dict)  # test -> zdtm's "FAIL at" stage

    def failed_before_restore(self, test: str) -> bool:
        return self.fail_stage.get(test, "").startswith(BEFORE_RESTORE)


def parse_tap(text: str) -> dict[str, str]:
    """zdtm's TAP: `ok N - NAME`, `ok N - NAME # SKIP REASON`, `not ok N - NAME # flavor F`."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        m = TAP_LINE.match(line.strip())
        if not m:
            continue
        directive = m.group("directive") or ""
        if m.group("not"):
            outcomes[m.group("name")] = "fail"
        elif directive.upper().startswith("SKIP"):
            outcomes[m.group("name")] = "skip: " + directive[4:].strip()
        else:
            outcomes[m.group("name")] = "pass"
    return outcomes


def parse_fail_stages(text: str) -> dict[str, str]:
    stages: dict[str, str] = {}
    for line in text.splitlines():
        m = FAIL_LINE.search(line)
        if m:
            stages.setdefault(m.group("name"), m.group("stage"))
    return stages


def load_run(path: Path) -> Run:
    flavor, _, daemon = path.name.partition("-")
    run = Run(flavor=flavor, daemon=daemon)
    if (path / "as-root").exists():
        run.as_root = (path / "as-root").read_text().strip()
    served = path / "served-by-snaptier"
    run.served_by_snaptier = len(served.read_text().split()) if served.exists() else 0
    taps = sorted((path / "report").glob("*.tap")) if (path / "report").is_dir() else []
    if not taps:
        exit_file = path / "exit"
        run.problem = (f"zdtm.py exited {exit_file.read_text().strip()} without a report" if exit_file.exists()
                       else "the run did not finish (see enter.log, zdtm.log)")
        return run
    for tap in taps:
        run.outcomes.update(parse_tap(tap.read_text(errors="replace")))
    if (path / "zdtm.log").exists():
        run.fail_stage = parse_fail_stages((path / "zdtm.log").read_text(errors="replace"))
    return run


def load_runs(out: Path) -> list[Run]:
    return [load_run(p) for p in sorted(out.iterdir()) if p.is_dir() and (p / "params").exists()]


@dataclass
class Verdict:
    regressions: list[tuple[str, str, str]]  # (flavor, daemon, test)
    broken_runs: list[Run]
    both_fail: list[tuple[str, str, str]]
    before_restore: list[tuple[str, str, str]]


def judge(runs: list[Run]) -> Verdict:
    by_key = {(r.flavor, r.daemon): r for r in runs}
    regressions, both_fail, before_restore = [], [], []
    broken = [r for r in runs if r.problem]
    for r in runs:
        if r.daemon == BASELINE or r.problem:
            continue
        if r.served_by_snaptier == 0 and any(o == "pass" for o in r.outcomes.values()):
            r.problem = "snaptier-lazy-pages never started: criu's own daemon must have served the run"
            broken.append(r)
            continue
        base = by_key.get((r.flavor, BASELINE))
        if base is None or base.problem:
            continue
        for test, outcome in r.outcomes.items():
            if outcome != "fail":
                continue
            if r.failed_before_restore(test):
                before_restore.append((r.flavor, r.daemon, test))
                continue
            (regressions if base.outcomes.get(test) == "pass" else both_fail).append((r.flavor, r.daemon, test))
        for test, outcome in base.outcomes.items():
            if outcome == "pass" and test not in r.outcomes:
                regressions.append((r.flavor, r.daemon, test + " (not run)"))
    return Verdict(regressions, broken, both_fail, before_restore)


def short(outcome: str | None) -> str:
    if outcome is None:
        return "-"
    return "skip" if outcome.startswith("skip") else outcome


def cell(run: Run, test: str) -> str:
    outcome = short(run.outcomes.get(test))
    if outcome == "fail" and test in run.fail_stage:
        return f"fail ({run.fail_stage[test][:24]})"
    return outcome


def table(runs: list[Run]) -> str:
    lines = []
    for flavor in sorted({r.flavor for r in runs}):
        cols = [r for r in runs if r.flavor == flavor]
        cols.sort(key=lambda r: (r.daemon != BASELINE, r.daemon))
        tests = sorted({t for r in cols for t in r.outcomes})
        lines.append(f"\n### flavor {flavor}\n")
        lines.append("| test | " + " | ".join(r.daemon for r in cols) + " |")
        lines.append("| --- |" + " --- |" * len(cols))
        for t in tests:
            lines.append(f"| {t.removeprefix('zdtm/')} | " + " | ".join(cell(r, t) for r in cols) + " |")
        totals = []
        for r in cols:
            if r.problem:
                totals.append(f"no report ({r.problem})")
                continue
            n = {k: sum(1 for o in r.outcomes.values() if short(o) == k) for k in ("pass", "fail", "skip")}
            served = f", {r.served_by_snaptier} served by snaptier-lazy-pages" if r.daemon != BASELINE else ""
            totals.append(f"{n['pass']} pass / {n['fail']} fail / {n['skip']} skip{served}")
        lines.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def write_files(out: Path, runs: list[Run], verdict: Verdict) -> None:
    (out / "results.json").write_text(json.dumps({
        "runs": [{"flavor": r.flavor, "daemon": r.daemon, "outcomes": r.outcomes, "fail_stage": r.fail_stage,
                  "problem": r.problem,
                  "tests_run_as_root": r.as_root, "served_by_snaptier": r.served_by_snaptier} for r in runs],
        "regressions": [{"flavor": f, "daemon": d, "test": t} for f, d, t in verdict.regressions],
        "fail_with_every_daemon": [{"flavor": f, "daemon": d, "test": t} for f, d, t in verdict.both_fail],
        "failed_before_restore": [{"flavor": f, "daemon": d, "test": t} for f, d, t in verdict.before_restore],
    }, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["flavor", "daemon", "test", "outcome"])
        for r in runs:
            for t, o in sorted(r.outcomes.items()):
                w.writerow([r.flavor, r.daemon, t, o])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    runs = load_runs(out)
    if not runs:
        print(f"report.py: no zdtm runs in {out}", file=sys.stderr)
        return 1
    verdict = judge(runs)
    print(table(runs))
    write_files(out, runs, verdict)
    as_root = {r.as_root for r in runs if r.as_root and r.as_root != "no"}
    if as_root:
        print(f"\nTests ran as root, not as zdtm's uid 18943 ({', '.join(sorted(as_root))}).")
    for r in verdict.broken_runs:
        print(f"\nFAILED: {r.flavor}-{r.daemon}: {r.problem}")
    for f, d, t in verdict.regressions:
        print(f"FAILED: {t} ({f} flavor): passes with CRIU's daemon, fails with {d}")
    if verdict.both_fail:
        print("\nFail with CRIU's daemon too (not counted): "
              + ", ".join(sorted({f"{t} ({f})" for f, _, t in verdict.both_fail})))
    if verdict.before_restore:
        print("Failed before any lazy-pages daemon ran (not counted): "
              + ", ".join(sorted({f"{t} ({f}, {d})" for f, d, t in verdict.before_restore})))
    ok = not verdict.regressions and not verdict.broken_runs
    print(f"\nzdtm: {'OK' if ok else 'FAILED'}: results in {out}/results.json, results.csv")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
