"""Bringing a native topology up and down: hosts as namespaces on this machine (backend = "native").

The same contract as the QEMU backend in launcher.py: `up` refuses a running topology and
undoes a half-made one, `down` is idempotent and removes exactly what `up` made (the hosts'
processes by tag, the network namespaces recorded in the state file, the CXL files), every wait
has a deadline. The mechanics (namespaces, veth, enter) are in native/snaptier_native.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .launcher import TestbedError, check_cxl_backing, mem_available, refuse_running, say
from .machine import ContainerSpec, Runtime, cxl_backing, describe_native, hosts_file_text, native_cxl_dir
from .state import REPO, TestbedState, state_dir_for
from .topology import Topology

sys.path[:0] = [str(REPO / "qemu"), str(REPO / "native")]
from snaptier_native import container  # noqa: E402
from snaptier_qemu import process  # noqa: E402

GUEST_AGENT = REPO / "build/guest/tier-agent/tier-agent"


def preflight(topology: Topology) -> list[str]:
    """What stops this topology from running natively here, as sentences (empty: nothing)."""
    problems = []
    missing = container.missing_tools()
    if missing:
        problems.append(f"the native backend needs {', '.join(missing)} (util-linux, iproute2): run 'make deps'")
    rdma_links = [l.name for l in topology.links if l.rdma]
    if rdma_links:
        reason = container.rxe_missing_reason()
        if reason:
            problems.append(f"link {rdma_links[0]} has rdma = true, but {reason}")
    return problems


def rootfs_of(image_dir: Path) -> Path:
    """The package rootfs an image was assembled from (guests/build-image.sh writes its key)."""
    info = dict(line.split("=", 1) for line in (image_dir / "info").read_text().splitlines() if "=" in line)
    return Path(image_dir.parent) / f"rootfs-{info['rootfs_key']}"


def check_rootfs(rootfs: Path) -> None:
    if not rootfs.is_dir():
        raise TestbedError(f"rootfs {rootfs} does not exist (build it with 'make image', or pass an existing one)")
    for need in ("bin/bash", "usr/sbin/criu", "usr/bin/python3"):
        if not (rootfs / need).exists():
            raise TestbedError(f"{rootfs} is not a snaptier guest rootfs: it has no /{need} (see guests/packages.txt)")


def _write_host_files(spec: ContainerSpec, topology: Topology) -> None:
    # A fresh host directory every up: nothing of an earlier run's agent state survives, as on a
    # freshly booted guest.
    host_dir = spec.params_file.parent
    shutil.rmtree(host_dir, ignore_errors=True)
    for d in (spec.scratch, spec.state):
        d.mkdir(parents=True)
    spec.params_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in spec.params))
    spec.hosts_file.write_text(hosts_file_text(topology))


def refuse_impossible(topology: Topology) -> None:
    problems = preflight(topology)
    if problems:
        raise TestbedError("; ".join(problems))


def up(topology: Topology, rootfs: Path, boot_timeout: float = 60) -> None:
    state_dir = state_dir_for(topology.name)
    refuse_impossible(topology)
    check_rootfs(rootfs)
    if not GUEST_AGENT.exists():
        raise TestbedError(f"{GUEST_AGENT} is missing: build the agent for the rootfs with 'make guest-agent'")
    refuse_running(topology, state_dir)
    runtime = Runtime(repo=REPO, state_dir=state_dir, image_dir=rootfs, accel="native", boot_id=secrets.token_hex(4))
    specs = describe_native(topology, runtime, rootfs)
    switches = sorted({p.switch_netns for s in specs for p in s.ports})
    clash = sorted(set([s.netns for s in specs] + switches) & container.netns_list())
    if clash:
        raise TestbedError(f"network namespace {clash[0]} already exists and topology {topology.name!r} is not up: "
                           f"another tool or a lost run made it; remove it ('ip netns delete {clash[0]}') "
                           "or give the topology another name")
    # The CXL files' tmpfs: sized for them, so check_cxl_backing sees its room.
    default_backed = [d for d in topology.cxl if not d.backing]
    if default_backed:
        need = sum(d.size for d in default_backed)
        if need > mem_available():
            raise TestbedError(f"the CXL devices need {need >> 20} MiB of memory; {mem_available() >> 20} MiB is available")
        pages = container.mount_huge_tmpfs(native_cxl_dir(topology), need + (16 << 20))
        say(f"CXL backing files on a tmpfs with {pages} at {native_cxl_dir(topology)}")
    check_cxl_backing(topology, runtime)

    share = state_dir / "share"
    (share / "status").mkdir(parents=True, exist_ok=True)
    for old in (share / "status").glob("*.json"):
        old.unlink()
    state = TestbedState(topology=str(topology.source or ""), name=topology.name, boot_id=runtime.boot_id,
                         accel="native", image_dir=str(rootfs), started_unix=time.time(), backend="native")
    state.save(state_dir)
    procs: dict[str, subprocess.Popen] = {}
    try:
        if any(l.rdma for l in topology.links):
            container.load_rxe()
        lifted = container.lift_pipe_limit()
        if lifted:
            say(lifted)
        for dev in topology.cxl:
            with open(cxl_backing(topology, dev.name, runtime), "wb") as f:
                f.truncate(dev.size)   # fresh and zeroed: CXL memory is volatile
        for netns in switches:
            container.make_switch(netns)
            state.netns.append(netns)
            state.save(state_dir)
        for spec in specs:
            container.make_host_netns(spec.netns)
            state.netns.append(spec.netns)
            state.save(state_dir)
            for port in spec.ports:
                container.attach(spec.netns, port.switch_netns, port.switch_port, port.iface, port.mac, port.address)
            _write_host_files(spec, topology)
            spec.console_log.unlink(missing_ok=True)
            procs[spec.name] = container.start(spec.tag, spec.name, rootfs, spec.scratch, spec.netns,
                                               spec.params_file,
                                               [(b.source, b.target, b.readonly) for b in spec.binds],
                                               spec.console_log)
            spec.pidfile.write_text(f"{procs[spec.name].pid}\n")
        wait_ready(specs, procs, runtime, boot_timeout)
    except BaseException:
        say("start-up failed: removing what was made")
        down(topology, quiet=True)
        raise


def wait_ready(specs: list[ContainerSpec], procs: dict[str, subprocess.Popen], runtime: Runtime,
               timeout: float) -> None:
    t0 = time.monotonic()
    pending = {s.name: s for s in specs}
    while pending:
        for name, spec in list(pending.items()):
            status_file = runtime.state_dir / "share" / "status" / f"{name}.json"
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                status = None
            if status and status.get("boot_id") == runtime.boot_id:
                if not status.get("ready"):
                    failed = [u for u, r in status.get("units", {}).items() if r != "ok"]
                    raise TestbedError(f"{name} started but its set-up failed in {', '.join(failed)}:\n  "
                                       + "\n  ".join(_log_tail(spec)))
                del pending[name]
                continue
            if procs[name].poll() is not None:
                raise TestbedError(f"{name}: the host exited while starting (exit {procs[name].returncode}):\n  "
                                   + "\n  ".join(_log_tail(spec)))
        if pending and time.monotonic() - t0 > timeout:
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {', '.join(sorted(pending))} "
                               f"(logs in {runtime.state_dir})")
        time.sleep(0.05)
    say(f"{len(specs)} native host{'s' if len(specs) != 1 else ''} ready after {time.monotonic() - t0:.1f} s")


def _log_tail(spec: ContainerSpec) -> list[str]:
    try:
        return spec.console_log.read_text(errors="replace").splitlines()[-12:]
    except OSError:
        return ["(no log)"]


def down(topology: Topology, quiet: bool = False) -> int:
    state_dir = state_dir_for(topology.name)
    tag_prefix = f"snaptier-{topology.name}-"
    pids: dict[int, str] = {}
    for h in topology.hosts:
        pid = process.owned_pid(state_dir / f"{h.name}.pid", f"process={tag_prefix}{h.name}")
        if pid:
            pids[pid] = f"process={tag_prefix}{h.name}"
    # Also hosts whose pidfile was lost: their unshare, or a PID 1 whose unshare is gone.
    inits = {container.init_pid(p) for p in process.tagged_pids(tag_prefix)}
    for pid in process.tagged_pids(tag_prefix):
        if pid not in inits:
            pids.setdefault(pid, f"process={tag_prefix}")
    for pid, tag in pids.items():
        container.stop(pid, tag)
    state = TestbedState.load(state_dir)
    for netns in (state.netns if state else []):
        container.delete_netns(netns)
    runtime = Runtime(repo=REPO, state_dir=state_dir, image_dir=Path("."), accel="native")
    for dev in topology.cxl:
        cxl_backing(topology, dev.name, runtime).unlink(missing_ok=True)
    container.unmount(native_cxl_dir(topology))
    try:
        native_cxl_dir(topology).rmdir()
    except OSError:
        pass
    for h in topology.hosts:
        (state_dir / f"{h.name}.pid").unlink(missing_ok=True)
    TestbedState.path(state_dir).unlink(missing_ok=True)
    hosts = sum(tag != f"process={tag_prefix}" for tag in pids.values())
    strays = len(pids) - hosts
    if not quiet:
        say(f"topology {topology.name!r} is down ({hosts} native host{'s' if hosts != 1 else ''} stopped"
            + (f", {strays} stray process{'es' if strays != 1 else ''} of it ended" if strays else "") + ")")
    return len(pids)


def exec_in(topology: Topology, host: str, command: list[str], timeout: float | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
    state_dir = state_dir_for(topology.name)
    if host not in {h.name for h in topology.hosts}:
        raise TestbedError(f"no host named {host!r} in topology {topology.name!r}")
    pid = process.owned_pid(state_dir / f"{host}.pid", f"process=snaptier-{topology.name}-{host}")
    init = container.init_pid(pid) if pid else None
    if init is None:
        raise TestbedError(f"{host} of topology {topology.name!r} is not running (run 'testbed/tb up')")
    argv = container.exec_argv(init, command)
    pipe = subprocess.PIPE if capture else None
    # Its own process group, so that a timeout ends the command inside the host too, not only nsenter.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if capture else None, stdout=pipe, stderr=pipe,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, proc.returncode, out or "", err or "")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, 124, out or "", (err or "") + f"\ntimed out after {timeout} s")
