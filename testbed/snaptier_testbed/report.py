"""Check results shared by `tb health` and `tb scenario`: one row type, one table, one closing
'N passed, N failed' line."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    check: str
    host: str
    ok: bool
    detail: str
    values: dict = field(default_factory=dict)
    skipped: bool = False   # needs what this topology or machine lacks; `detail` says what


def skipped(check: str, host: str, reason: str) -> Check:
    return Check(check, host, True, reason, skipped=True)


def print_checks(title: str, checks: list[Check], label: str, notes: tuple[str, ...] = ()) -> int:
    """Prints the table; returns the exit status (0 only if every check passed)."""
    width = max((len(c.check) for c in checks), default=10)
    print(f"\n{title}")
    print(f"  {'check':{width}}  {'host':6}  {'result':6}  detail")
    for c in checks:
        result = "skip" if c.skipped else "ok" if c.ok else "FAIL"
        print(f"  {c.check:{width}}  {c.host:6}  {result:6}  {c.detail}")
    if notes:
        print()
        for note in notes:
            print(f"  {note}")
    passed = sum(c.ok and not c.skipped for c in checks)
    failed = sum(not c.ok for c in checks)
    n_skipped = sum(c.skipped for c in checks)
    print(f"{label}: {passed} passed, {failed} failed" + (f", {n_skipped} skipped" if n_skipped else ""))
    return 0 if failed == 0 else 1
