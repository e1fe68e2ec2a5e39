"""The native backend's mechanics: a host is a set of namespaces on this machine's own kernel.

Each host gets a network namespace (`ip netns`, named snaptier-TOPOLOGY-host-HOST) holding the
veth end of each of its links; each link is a bridge in a switch namespace of its own
(snaptier-TOPOLOGY-link-LINK), so nothing of a topology appears in this machine's own network
namespace. The host's processes run under `unshare` (mount, UTS, IPC and pid namespaces; full
capabilities, no seccomp filter: CRIU needs both) with `native/enter` as PID 1, which builds the
root as an overlay of the guests' trixie rootfs and execs the host's init. util-linux and iproute2 do all of
it; no daemon is involved. docs/testbed.md says why not systemd-nspawn or LXC.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parents[1]
ENTER = NATIVE_DIR / "enter"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ContainerError(RuntimeError):
    pass


def _ip(*args: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ContainerError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


# ---------------------------------------------------------------- what this machine offers
def missing_tools() -> list[str]:
    return [t for t in ("unshare", "nsenter", "ip") if shutil.which(t) is None]


def rxe_missing_reason() -> str | None:
    """None if Soft-RoCE can run on this kernel, else a sentence naming what is missing."""
    if Path("/sys/module/rdma_rxe").is_dir():
        return None
    if shutil.which("modprobe") and subprocess.run(["modprobe", "-n", "rdma_rxe"], capture_output=True).returncode == 0:
        return None
    return (f"this machine's kernel ({os.uname().release}) has no rdma_rxe module, so a native host cannot "
            "use Soft-RoCE; drop 'rdma = true' from the link (cold pages then go to the file tier) "
            "or use the qemu backend")


def load_rxe() -> None:
    if not Path("/sys/module/rdma_rxe").is_dir():
        subprocess.run(["modprobe", "rdma_rxe"], check=True, timeout=30)
    # Each host names its device rxe0: RDMA devices must then belong to one namespace each.
    subprocess.run(["rdma", "system", "set", "netns", "exclusive"], capture_output=True, timeout=10)


CAP_SYS_RESOURCE = 24
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
CRIU_PIPE_BYTES = 64 << 20


def lift_pipe_limit() -> str | None:
    """CRIU moves a lazily dumped process's pages through pipes it grows past the machine's
    pipe-max-size (criu-remote's page server), which only CAP_SYS_RESOURCE may do. Where root
    lacks that capability (as in some sandboxes) the dump fails ("tee: ... Operation not
    permitted"), so the limit is raised for every host of this kernel. Returns what it did."""
    cap_eff = int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                       if l.startswith("CapEff:")).split()[1], 16)
    before = int(PIPE_MAX_SIZE.read_text())
    if cap_eff & (1 << CAP_SYS_RESOURCE) or before >= CRIU_PIPE_BYTES:
        return None
    PIPE_MAX_SIZE.write_text(f"{CRIU_PIPE_BYTES}\n")
    return (f"root here lacks CAP_SYS_RESOURCE: raised fs.pipe-max-size from {before >> 10} KiB to "
            f"{CRIU_PIPE_BYTES >> 20} MiB for CRIU's page pipes")


def mount_huge_tmpfs(path: Path, size: int) -> str:
    """A tmpfs of `size` bytes at `path` that backs its files with huge pages where it can
    (huge=always): the CXL files native hosts map in place, so that a restored process's first
    touch of a 2 MiB block is one fault. Where the kernel has no transparent huge pages, a plain
    tmpfs. Returns what it mounted. A tmpfs already there (a lost run) is replaced."""
    path.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(path):
        unmount(path)
    for options, what in ((f"huge=always,size={size},mode=0700", "huge pages"), (f"size={size},mode=0700", "4 KiB pages")):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "snaptier-cxl", str(path)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        if proc.returncode == 0:
            return what
    raise ContainerError(f"cannot mount a tmpfs at {path}: {proc.stderr.strip()}")


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        proc = subprocess.run(["umount", str(path)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        if proc.returncode != 0:
            raise ContainerError(f"cannot unmount {path}: {proc.stderr.strip()}")


def netns_list() -> set[str]:
    proc = _ip("netns", "list", check=False)
    return {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}


# ---------------------------------------------------------------- network
def make_switch(netns: str) -> None:
    _ip("netns", "add", netns)
    _ip("-n", netns, "link", "add", "br0", "type", "bridge")
    _ip("-n", netns, "link", "set", "br0", "up")


def make_host_netns(netns: str) -> None:
    _ip("netns", "add", netns)
    _ip("-n", netns, "link", "set", "lo", "up")


def attach(host_netns: str, switch_netns: str, switch_port: str, iface: str, mac: str, address: str) -> None:
    """A veth pair created straight into the two namespaces: no name ever exists in ours."""
    _ip("link", "add", switch_port, "netns", switch_netns, "type", "veth", "peer", "name", iface, "netns", host_netns)
    _ip("-n", switch_netns, "link", "set", switch_port, "master", "br0", "up")
    _ip("-n", host_netns, "link", "set", iface, "address", mac)
    _ip("-n", host_netns, "addr", "add", address, "dev", iface)
    _ip("-n", host_netns, "link", "set", iface, "up")


def delete_netns(netns: str) -> None:
    """Deleting a namespace deletes the veth ends in it, and so their peers."""
    _ip("netns", "delete", netns, check=False)


# ---------------------------------------------------------------- hosts
def start(tag: str, hostname: str, rootfs: Path, scratch: Path, netns: str, params_file: Path,
          binds: list[tuple[Path, str, bool]], log: Path) -> subprocess.Popen:
    """Starts the host; returns its `unshare` process (whose child is the host's PID 1)."""
    argv = ["nsenter", f"--net=/run/netns/{netns}", "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork",
            "--kill-child", "--", str(ENTER), f"process={tag}", hostname, str(rootfs), str(scratch),
            str(params_file)]
    argv += [f"{'ro' if ro else 'rw'}:{src}:{dst}" for src, dst, ro in binds]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={"PATH": HOST_PATH})


def init_pid(unshare_pid: int) -> int | None:
    """The host's PID 1 as this machine sees it: the one child of its `unshare`."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def exec_argv(init: int, command: list[str]) -> list[str]:
    """Runs a command in every namespace and the root of the host, with a clean login-like
    environment (nothing of this machine's environment leaks in)."""
    return ["nsenter", "-t", str(init), "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--",
            "env", "-i", f"PATH={HOST_PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "/bin/bash", "-c",
            " ".join(command)]


def stop(pid: int, tag: str, wait_s: float = 5) -> None:
    """Ends a host at once, as pulling its power would: SIGKILL to its PID 1 makes the kernel kill
    every process of the pid namespace, and its `unshare` then exits (which ignores SIGTERM while
    its child runs). Only while `pid` still carries `tag`, so a recycled pid is never signalled."""
    from snaptier_qemu.process import cmdline_of
    if tag not in cmdline_of(pid):
        return
    for target in (init_pid(pid), pid):
        if target is None:
            continue
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if _wait_dead(pid, wait_s):
            return
    raise ContainerError(f"native host process {pid} ({tag}) did not exit after SIGKILL")


def _wait_dead(pid: int, timeout_s: float) -> bool:
    """Gone or a zombie: whoever adopted the orphaned unshare may be slow to reap it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
