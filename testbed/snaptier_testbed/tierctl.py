"""Running `tierctl --json` in a host of a running topology, and reading its answer.

The one helper every subcommand uses (matrix, chaos, burst, scenarios): the command line, the
bound (tierctl's own timeout plus a margin for the shell that carries it), the parse of its
one JSON object, and a sentence for each way it can fail.
"""
from __future__ import annotations

import json

from . import agents, launcher
from .launcher import TestbedError
from .topology import Topology

TIERCTL = f"{agents.GUEST_BUILD}/tierctl --socket {agents.AGENT_SOCKET}"
SSH_MARGIN_S = 60  # the launcher's timeout is tierctl's plus this


def parse_json_output(stdout: str) -> dict | None:
    """tierctl --json prints one object; tolerate stray lines before it."""
    text = stdout.strip()
    if not text:
        return None
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, dict) else None
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
                return doc if isinstance(doc, dict) else None
            except ValueError:
                continue
    return None


def describe_failure(rc: int, stderr: str, stdout: str, timeout_s: float) -> str:
    msg = " ".join((stderr.strip() or stdout.strip()).split())[-300:]
    if rc == 1:
        return msg or "the agent replied with an error"
    if rc == 2:
        return f"tierctl refused the arguments (an older build?): {msg}"
    if rc == 3:
        return f"cannot reach the agent or it timed out: {msg}" if msg else "cannot reach the agent or it timed out"
    if rc == 124:
        return f"no answer within {timeout_s:.0f} s"
    if rc == 255:
        return f"ssh to the guest failed: {msg}"
    return f"tierctl exited {rc}: {msg}"


def tierctl(run, topo: Topology, host: str, args: str, timeout_s: int) -> tuple[int, dict | None, str]:
    """(exit status, parsed JSON object or None, error text or ''). `run` is launcher.run_in
    (or a test's fake with its signature)."""
    run = run or launcher.run_in
    command = f"{TIERCTL} --timeout-ms {timeout_s * 1000} --json {args}"
    try:
        r = run(topo, host, command, timeout=timeout_s + SSH_MARGIN_S)
    except TestbedError as e:  # e.g. the topology went down mid-run
        return 255, None, str(e)
    doc = parse_json_output(r.stdout or "")
    err = "" if r.returncode == 0 and doc is not None else describe_failure(
        r.returncode, r.stderr or "", r.stdout or "", timeout_s + SSH_MARGIN_S)
    if r.returncode == 0 and doc is None:
        err = f"tierctl printed no JSON object: {(r.stdout or '').strip()[-200:]!r}"
    return r.returncode, doc, err
