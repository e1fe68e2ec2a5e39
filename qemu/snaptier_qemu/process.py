"""Starting and stopping QEMU processes, and nothing but the ones this testbed started.

A process is ours only if its pidfile names it AND its command line carries our tag
(``-name HOST,process=snaptier-TOPOLOGY-HOST``): a recycled pid is never signalled.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class LaunchError(RuntimeError):
    pass


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def owned_pid(pidfile: Path, tag: str) -> int | None:
    """The pid in `pidfile` if that process is alive and carries `tag`, else None."""
    pid = read_pid(pidfile)
    if pid and tag in cmdline_of(pid):
        return pid
    return None


def tagged_pids(tag_prefix: str) -> list[int]:
    """Every live process whose command line carries a tag starting with `tag_prefix`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and f"process={tag_prefix}" in cmdline_of(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def start(argv: list[str], timeout_s: float = 90) -> None:
    """Runs a daemonizing QEMU; returns once it has daemonized, raises with QEMU's own words."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"QEMU did not finish starting within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError("QEMU refused to start: " + (" / ".join(msg[-3:]) if msg else f"exit {proc.returncode}"))


def qmp(sock_path: Path, command: str, timeout_s: float = 5) -> dict:
    """One QMP command on a fresh connection (capabilities negotiated first)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    return {}
                reply = json.loads(line)
                if "return" in reply or "error" in reply:
                    break
        return reply


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        try:
            # Reap it if it happens to be our child; harmless otherwise.
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return not Path(f"/proc/{pid}").exists()


def stop(pid: int, tag: str, qmp_socket: Path | None = None, grace_s: float = 10) -> None:
    """QMP quit, then SIGTERM, then SIGKILL, each bounded; only if `pid` still carries `tag`."""
    if tag not in cmdline_of(pid):
        return
    if qmp_socket and qmp_socket.exists():
        try:
            qmp(qmp_socket, "quit", timeout_s=3)
        except (OSError, ValueError):
            pass
        if wait_gone(pid, grace_s):
            return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        if tag not in cmdline_of(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, wait_s):
            return
    raise LaunchError(f"process {pid} ({tag}) did not exit after SIGKILL")
