"""Bringing a topology up and down, and running commands in its hosts. The QEMU backend lives
here; a topology with backend = "native" is handed to native.py, one with backend = "libvirt" to
libvirt_backend.py, which keep the same contract: idempotent `down`; `up` refuses to start over
a running topology; every wait has a deadline."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .machine import MachineSpec, Runtime, cxl_backing, describe, switch_socket
from .state import REPO, TestbedState, state_dir_for
from .topology import MiB, Topology

sys.path.insert(0, str(REPO / "qemu"))
from snaptier_qemu import process  # noqa: E402
from snaptier_qemu.argv import qemu_argv  # noqa: E402

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=6"]


class TestbedError(RuntimeError):
    """Something the user must act on; the message says what."""


def say(msg: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def running_hosts(topology: Topology, state_dir: Path) -> dict[str, int]:
    """Hosts whose process (a QEMU, or a native host's unshare) is alive and carries its tag."""
    if topology.backend == "libvirt":   # its hosts may be on other machines
        from . import libvirt_backend
        return libvirt_backend.running_hosts(topology, state_dir)
    running = {}
    for h in topology.hosts:
        pid = process.owned_pid(state_dir / f"{h.name}.pid", f"process=snaptier-{topology.name}-{h.name}")
        if pid:
            running[h.name] = pid
    return running


# ---------------------------------------------------------------- accelerator
def resolve_accel(requested: str, image_dir: Path) -> str:
    """'auto' becomes 'kvm-then-tcg' only if a real guest kernel boots under KVM here."""
    if requested == "tcg":
        return "tcg"
    if requested == "kvm":
        return "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = Path(os.environ.get("SNAPTIER_CACHE", "/var/cache/snaptier")) / "kvm-probe"
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = f"{os.uname().release} {qemu_version} {(image_dir / 'vmlinuz').stat().st_size}"
    try:
        cached_key, verdict = cache.read_text().split("\n")[:2]
        if cached_key == key:
            return verdict
    except (OSError, ValueError):
        pass
    say("probing whether KVM can run a guest here (once per machine)")
    # The kernel hands the words after '--' to init: busybox powers off at once.
    argv = ["timeout", "40", "qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-cpu", "max", "-m", "256M",
            "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(image_dir / "vmlinuz"), "-initrd", str(image_dir / "initrd.img"),
            "-append", "console=ttyS0 panic=-1 rdinit=/bin/busybox -- poweroff -f"]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    ok = proc.returncode == 0 and "Linux version" in proc.stdout
    verdict = "kvm-then-tcg" if ok else "tcg"
    say(f"KVM {'works' if ok else 'cannot run guests here'}: using {verdict}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(f"{key}\n{verdict}\n")
    return verdict


# ---------------------------------------------------------------- image
def ensure_image(image_dir: str | None) -> Path:
    if image_dir:
        d = Path(image_dir)
        for f in ("vmlinuz", "initrd.img", "root.img"):
            if not (d / f).exists():
                raise TestbedError(f"image directory {d} has no {f}")
        return d
    proc = subprocess.run(["bash", str(REPO / "guests" / "build-image.sh")], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise TestbedError("building the guest image failed (see the messages above)")
    return Path(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- up
def check_resources(topology: Topology, runtime: Runtime) -> None:
    need = sum(h.memory for h in topology.hosts) + check_cxl_backing(topology, runtime)
    avail = mem_available()
    if need > avail:
        raise TestbedError(f"the topology needs {need // MiB} MiB of RAM (guests + CXL backing) but only {avail // MiB} MiB is available")


def check_cxl_backing(topology: Topology, runtime: Runtime) -> int:
    """Refuses CXL backing files that have no room; returns the bytes they take in /dev/shm."""
    shm_needed = 0
    for dev in topology.cxl:
        path = cxl_backing(topology, dev.name, runtime)
        if not path.parent.is_dir():
            raise TestbedError(f"cxl {dev.name}: directory {path.parent} for the backing file does not exist")
        if str(path).startswith("/dev/shm"):
            shm_needed += dev.size
        else:
            free = shutil.disk_usage(path.parent).free
            if free < dev.size:
                raise TestbedError(f"cxl {dev.name}: {path.parent} has {free // MiB} MiB free, the device needs {dev.size // MiB} MiB")
    if shm_needed:
        free = shutil.disk_usage(runtime.shm_dir).free
        if free < shm_needed:
            raise TestbedError(f"/dev/shm has {free // MiB} MiB free; the CXL backing files need {shm_needed // MiB} MiB")
    return shm_needed


def refuse_running(topology: Topology, state_dir: Path) -> None:
    already = running_hosts(topology, state_dir)
    if already:
        raise TestbedError(f"topology {topology.name!r} is already up ({', '.join(sorted(already))} running); "
                           "use 'status', or 'down' first")


def start_switch(runtime: Runtime, link_name: str, topo_name: str) -> int:
    sock = switch_socket(runtime, link_name)
    pidfile = runtime.state_dir / f"switch-{link_name}.pid"
    shutil.rmtree(sock, ignore_errors=True)
    # The tag in the argv (via --mgmt path) identifies our switch among any others.
    mgmt = runtime.state_dir / f"switch-{link_name}.mgmt"
    subprocess.run(["timeout", "20", "vde_switch", "--sock", str(sock), "--mgmt", str(mgmt), "--mode", "0600",
                    "--daemon", "--pidfile", str(pidfile)], check=True, stdin=subprocess.DEVNULL)
    for _ in range(100):
        pid = process.read_pid(pidfile)
        if pid and (sock / "ctl").exists():
            return pid
        time.sleep(0.05)
    raise TestbedError(f"vde_switch for link {link_name} did not come up")


def up(topology: Topology, image_dir: str | None = None, boot_timeout: float = 300,
       rootfs: str | None = None) -> None:
    if topology.backend == "native":
        from . import native
        native.refuse_impossible(topology)   # before minutes of image building
        native.up(topology, Path(rootfs) if rootfs else native.rootfs_of(ensure_image(image_dir)),
                  boot_timeout=min(boot_timeout, 120))
        return
    if rootfs:
        raise TestbedError("--rootfs is for native topologies (backend = \"native\"); QEMU guests boot --image")
    if topology.backend == "libvirt":
        from . import libvirt_backend
        libvirt_backend.up(topology, image_dir, boot_timeout=boot_timeout)
        return
    state_dir = state_dir_for(topology.name)
    refuse_running(topology, state_dir)
    # Refuse impossible topologies before spending minutes on an image build.
    check_resources(topology, Runtime(repo=REPO, state_dir=state_dir, image_dir=Path("."), accel="tcg"))
    image = ensure_image(image_dir)
    runtime, state = prepare_guests(topology, state_dir, image)

    def start_one(spec: MachineSpec) -> None:
        say(f"starting {spec.name} ({spec.role}, {spec.cpus} cpu, {spec.memory // MiB} MiB"
            f"{', cxl ' + spec.cxl.emulation if spec.cxl else ''}, {runtime.accel})")
        process.start(qemu_argv(spec))
    start_guests(topology, runtime, state, start_one, boot_timeout)


def start_guests(topology: Topology, runtime: Runtime, state: TestbedState, start_one, boot_timeout: float) -> None:
    """The direct launcher's guests of a prepared topology (`start_one(spec)` starts one): CXL
    backings and switches first, each host's old files cleared, then the boot wait; on any
    failure everything made is removed (`down`). libvirt_backend.up does the same per machine."""
    specs = describe(topology, runtime)
    try:
        start_cxl_and_switches(topology, runtime, state)
        for spec in specs:
            for p in (spec.console_log, spec.console_socket, spec.qmp_socket, spec.pidfile):
                p.unlink(missing_ok=True)
            start_one(spec)
        wait_ready(topology, specs, runtime, boot_timeout)
    except BaseException:
        say("start-up failed: removing what was made")
        down(topology, quiet=True)
        raise


def prepare_guests(topology: Topology, state_dir: Path, image: Path, backend: str = "qemu",
                   ssh_ports: dict[str, int] | None = None,
                   ssh_via: dict[str, list] | None = None) -> tuple[Runtime, TestbedState]:
    """What QEMU guests need before the first starts, whoever starts them: the accelerator, the
    shared directory, the ssh key, ports (free here unless given: hosts on other machines get
    ports free there, reached through that machine, `ssh_via`), a boot id and the state file."""
    accel = resolve_accel(topology.accel, image)
    state_dir.mkdir(parents=True, exist_ok=True)
    share = state_dir / "share"
    (share / "status").mkdir(parents=True, exist_ok=True)
    for old in (share / "status").glob("*.json"):
        old.unlink()
    runtime = Runtime(repo=REPO, state_dir=state_dir, image_dir=image, accel=accel,
                      ssh_ports=ssh_ports or {h.name: free_port() for h in topology.hosts},
                      boot_id=secrets.token_hex(4))

    key = state_dir / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"snaptier-{topology.name}", "-f", str(key)],
                       check=True, stdin=subprocess.DEVNULL, timeout=30)
    (share / "ssh").mkdir(exist_ok=True)
    shutil.copy(f"{key}.pub", share / "ssh" / "authorized_keys")

    state = TestbedState(topology=str(topology.source or ""), name=topology.name, boot_id=runtime.boot_id,
                         accel=accel, image_dir=str(image), ssh_ports=runtime.ssh_ports, started_unix=time.time(),
                         backend=backend, ssh_via=dict(ssh_via or {}))
    state.save(state_dir)
    return runtime, state


def start_cxl_and_switches(topology: Topology, runtime: Runtime, state: TestbedState) -> None:
    for dev in topology.cxl:
        path = cxl_backing(topology, dev.name, runtime)
        # A fresh, zeroed device on every up: CXL memory is volatile.
        with open(path, "wb") as f:
            f.truncate(dev.size)
    for link in topology.links:
        state.switches[link.name] = start_switch(runtime, link.name, topology.name)
        state.save(runtime.state_dir)


class LocalWatch:
    """How the boot wait sees a guest on this machine: its status file in the shared directory,
    its QEMU by pidfile and tag, its serial log. The libvirt backend passes one that looks on the
    guest's own machine."""
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def status_text(self, spec: MachineSpec) -> str | None:
        try:
            return (self.runtime.state_dir / "share" / "status" / f"{spec.name}.json").read_text()
        except OSError:
            return None

    def alive(self, spec: MachineSpec) -> bool:
        return process.owned_pid(spec.pidfile, f"process={spec.tag}") is not None

    def console_tail(self, spec: MachineSpec, lines: int = 10) -> list[str]:
        log = spec.console_log
        return log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []

    def ssh_via(self, spec: MachineSpec) -> list | None:
        return None


def wait_ready(topology: Topology, specs: list[MachineSpec], runtime: Runtime, timeout: float,
               watch: LocalWatch | None = None) -> None:
    watch = watch or LocalWatch(runtime)
    t0 = time.monotonic()
    pending = {s.name: s for s in specs}
    last_note = t0
    while pending:
        for name, spec in list(pending.items()):
            text = watch.status_text(spec)
            if text is not None:
                try:
                    status = json.loads(text)
                except ValueError:
                    continue
                if status.get("boot_id") != runtime.boot_id:
                    continue
                if not status.get("ready"):
                    failed = [u for u, r in status.get("units", {}).items() if r != "ok"]
                    raise TestbedError(f"{name} booted but its set-up failed in {', '.join(failed)}; "
                                       f"see {spec.console_log}")
                # Here, whichever machine it booted on: agent configs and `status` read it.
                local_status = runtime.state_dir / "share" / "status" / f"{name}.json"
                if not local_status.exists() or local_status.read_text() != text:
                    local_status.write_text(text)
                say(f"{name} ready after {time.monotonic() - t0:.0f} s (guest uptime {status.get('uptime_s', 0):.1f} s)")
                del pending[name]
                continue
            if not watch.alive(spec):
                tail = watch.console_tail(spec)
                raise TestbedError(f"{name}: QEMU exited during boot. Last console lines:\n  " + "\n  ".join(tail))
        if not pending:
            break
        now = time.monotonic()
        if now - t0 > timeout:
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {', '.join(sorted(pending))} "
                               f"(console logs in {runtime.state_dir})")
        if now - last_note > 15:
            say(f"waiting for {', '.join(sorted(pending))} ({now - t0:.0f} s)")
            last_note = now
        time.sleep(0.5)
    # sshd is started by the last unit; make sure every host answers before declaring success.
    for spec in specs:
        deadline = time.monotonic() + 60
        while True:
            if ssh(runtime.state_dir, runtime.ssh_ports[spec.name], ["true"], timeout=20,
                   via=watch.ssh_via(spec)).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise TestbedError(f"{spec.name}: ssh does not answer on port {runtime.ssh_ports[spec.name]}")
            time.sleep(1)


# ---------------------------------------------------------------- down
def down(topology: Topology, quiet: bool = False) -> int:
    """Stops every process of this topology (by tag) and removes its volatile files."""
    if topology.backend == "native":
        from . import native
        return native.down(topology, quiet=quiet)
    if topology.backend == "libvirt":
        from . import libvirt_backend
        return libvirt_backend.down(topology, quiet=quiet)
    state_dir = state_dir_for(topology.name)
    tag_prefix = f"snaptier-{topology.name}-"
    pids = {}
    for h in topology.hosts:
        pid = process.owned_pid(state_dir / f"{h.name}.pid", f"process={tag_prefix}{h.name}")
        if pid:
            pids[pid] = (h.name, state_dir / f"{h.name}.qmp")
    for pid in process.tagged_pids(tag_prefix):  # also ones whose pidfile was lost
        pids.setdefault(pid, (None, None))
    def stop_one(item):
        pid, (name, qmp_sock) = item
        tag = f"process={tag_prefix}{name}" if name else f"process={tag_prefix}"
        if not quiet:
            say(f"stopping {name or pid}")
        process.stop(pid, tag, qmp_sock)

    # Concurrently: each stop is bounded (QMP quit, SIGTERM, SIGKILL), so `down` takes as long
    # as the slowest guest, not the sum.
    with ThreadPoolExecutor(max_workers=max(1, len(pids))) as pool:
        list(pool.map(stop_one, pids.items()))
    stopped = len(pids)
    remove_volatile(topology, state_dir)
    if not quiet:
        say(f"topology {topology.name!r} is down ({stopped} QEMU process{'es' if stopped != 1 else ''} stopped)")
    return stopped


def remove_volatile(topology: Topology, state_dir: Path, cxl_devices: set[str] | None = None) -> None:
    """After the guests are gone: the switches, CXL backing files (those named in `cxl_devices`
    if given: the others are on another machine), sockets, pidfiles, state file."""
    for link in topology.links:
        pidfile = state_dir / f"switch-{link.name}.pid"
        pid = process.read_pid(pidfile)
        mgmt = str(state_dir / f"switch-{link.name}.mgmt")
        # The pidfile, and any other vde_switch with our management socket (a lost pidfile).
        pids = {pid} if pid and mgmt in process.cmdline_of(pid) else set()
        pids |= {int(e.name) for e in Path("/proc").iterdir()
                 if e.name.isdigit() and f"--mgmt {mgmt} " in process.cmdline_of(int(e.name)) + " "}
        for p in pids:
            process.stop(p, mgmt)
        pidfile.unlink(missing_ok=True)
        shutil.rmtree(state_dir / f"switch-{link.name}", ignore_errors=True)
        Path(mgmt).unlink(missing_ok=True)
    runtime = Runtime(repo=REPO, state_dir=state_dir, image_dir=Path("."), accel="tcg")
    for dev in (d for d in topology.cxl if cxl_devices is None or d.name in cxl_devices):
        cxl_backing(topology, dev.name, runtime).unlink(missing_ok=True)
    for h in topology.hosts:
        for suffix in (".pid", ".qmp", ".console"):
            (state_dir / f"{h.name}{suffix}").unlink(missing_ok=True)
    TestbedState.path(state_dir).unlink(missing_ok=True)


# ---------------------------------------------------------------- exec
def proxy_command(via: list) -> str:
    """ssh's ProxyCommand to a port on another machine's loopback, through that machine (its
    own ssh configuration, never prompting)."""
    destination, port = via
    return shlex.join(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                       *(["-p", str(port)] if port else []), "-W", "%h:%p", destination])


def ssh(state_dir: Path, port: int, command: list[str], timeout: float | None = None,
        capture: bool = True, tty: bool = False, stdin=subprocess.DEVNULL,
        via: list | None = None) -> subprocess.CompletedProcess:
    """ssh into a guest by its forwarded port: on this machine's loopback, or on the loopback of
    the machine `via` names ([destination, port])."""
    argv = ["ssh", "-i", str(state_dir / "id_ed25519"), "-p", str(port), *SSH_OPTS]
    if via:
        argv += ["-o", f"ProxyCommand={proxy_command(via)}"]
    if tty:
        argv.append("-t")
    argv += ["root@127.0.0.1", *command]
    try:
        return subprocess.run(argv, stdin=stdin, capture_output=capture, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {timeout} s")


def load_running(topology: Topology) -> tuple[TestbedState, Path]:
    state_dir = state_dir_for(topology.name)
    state = TestbedState.load(state_dir)
    if state is None or not running_hosts(topology, state_dir):
        raise TestbedError(f"topology {topology.name!r} is not up (run 'make testbed' or 'testbed/tb up')")
    return state, state_dir


def exec_in(topology: Topology, host: str, command: list[str], timeout: float | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
    """One command in a host (ssh into a guest; nsenter into a native host), output captured."""
    state, state_dir = load_running(topology)
    if topology.backend == "native":
        from . import native
        return native.exec_in(topology, host, command, timeout=timeout, capture=capture)
    if host not in state.ssh_ports:
        raise TestbedError(f"no host named {host!r} in topology {topology.name!r}")
    return ssh(state_dir, state.ssh_ports[host], command, timeout=timeout, capture=capture,
               stdin=None if not capture else subprocess.DEVNULL, via=state.ssh_via.get(host))


def run_in(topology: Topology, host: str, script: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
    """One shell command line in a guest, its output captured."""
    return exec_in(topology, host, [script], timeout=timeout)
