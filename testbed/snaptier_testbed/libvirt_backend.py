"""Bringing a topology up and down as libvirt domains (backend = "libvirt").

The same machines as the direct QEMU backend — one MachineSpec per host, translated by
qemu/snaptier_qemu/domain_xml.py instead of argv.py — defined and started through `virsh` at
the topology's `uri`. The same contract as launcher.py and native.py: `up` refuses a running
topology and undoes a half-made one, `down` is idempotent and removes exactly what `up` made
(the domains named snaptier-<topology>-<host> that carry this topology's marker, the switches,
the overlays and the CXL files), every virsh call and every wait has a deadline.

Only a libvirt on this machine is supported: the 9p shares, the CXL backing file in /dev/shm,
the VDE switches and ssh on 127.0.0.1 are this machine's. A topology file may already place its
hosts on several [[machine]]s (the format and its rules are parsed and checked); bringing such a
topology up is refused until the launcher reaches other machines (issue 15 item 2).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from .launcher import (TestbedError, check_resources, ensure_image, prepare_guests, refuse_running,
                       remove_volatile, say, start_guests)
from .machine import MachineSpec, Runtime, host_tag
from .state import REPO, state_dir_for
from .topology import MiB, Topology

sys.path.insert(0, str(REPO / "qemu"))
from snaptier_qemu import process  # noqa: E402
from snaptier_qemu.domain_xml import domain_name, domain_xml, parse_metadata  # noqa: E402

VIRSH_TIMEOUT = 60       # one virsh call; `start` of a TCG guest returns in a few seconds
QEMU_PID_TIMEOUT = 30    # from `virsh start` returning to its QEMU being found by its tag
DAEMON_SCRIPT = "testbed/libvirt/daemon.sh"


def virsh(uri: str, *args: str, timeout: float = VIRSH_TIMEOUT) -> subprocess.CompletedProcess:
    """One virsh command; a missing virsh or a call that hangs is a TestbedError, not a traceback."""
    argv = ["virsh", "-q", "-c", uri, *args]
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TestbedError("virsh is not installed: the libvirt backend needs libvirt-clients "
                           "(run 'make deps')") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"'virsh {' '.join(args)}' at {uri} did not finish within {timeout:.0f} s "
                           "(is the libvirt daemon stuck?)") from None


def _error(proc: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
    return " / ".join(lines[-3:]) if lines else f"exit {proc.returncode}"


def preflight(topology: Topology) -> list[str]:
    """What stops this topology from running here, as sentences (empty: nothing)."""
    if len(topology.machines) > 1:
        where = "; ".join(f"{m.name} ({m.uri}): " + ", ".join(h.name for h in topology.hosts if h.machine == m.name)
                          for m in topology.machines)
        return [f"its hosts are on {len(topology.machines)} machines ({where}); the libvirt backend brings up "
                "the hosts of one machine only so far (several machines: not built yet)"]
    uri = topology.uri
    host = urlsplit(uri).hostname
    if host not in (None, "", "localhost"):
        return [f"uri {uri!r} names another machine ({host}); the libvirt backend runs domains on this "
                "machine only (its shares, CXL files and switches are local)"]
    try:
        proc = virsh(uri, "version", timeout=20)
    except TestbedError as e:
        return [str(e)]
    if proc.returncode != 0:
        hint = f"start it with '{DAEMON_SCRIPT} start' (as root)" if uri == "qemu:///system" else "check the uri"
        return [f"libvirt at {uri} does not answer ({_error(proc)}); {hint}"]
    return []


def refuse_impossible(topology: Topology) -> None:
    problems = preflight(topology)
    if problems:
        raise TestbedError("; ".join(problems))


def list_domains(uri: str) -> list[str]:
    proc = virsh(uri, "list", "--all", "--name")
    if proc.returncode != 0:
        raise TestbedError(f"cannot list the domains at {uri}: {_error(proc)}")
    return [l.strip() for l in proc.stdout.splitlines() if l.strip()]


def marker_of(uri: str, name: str) -> dict[str, str] | None:
    proc = virsh(uri, "dumpxml", "--inactive", name)
    return parse_metadata(proc.stdout) if proc.returncode == 0 else None


def is_ours(marker: dict[str, str] | None, topology: Topology, state_dir: Path) -> bool:
    """Defined by this topology from this checkout: a same-named topology of another checkout
    (another state directory) is not ours to remove."""
    return bool(marker) and marker.get("topology") == topology.name and marker.get("state") == str(state_dir)


def domain_state(uri: str, name: str) -> str:
    proc = virsh(uri, "domstate", name)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def domain_names(topology: Topology) -> dict[str, str]:
    """Host name -> domain name (the host's tag), without describing the machines."""
    return {h.name: host_tag(topology.name, h.name) for h in topology.hosts}


def refuse_clashes(topology: Topology, state_dir: Path) -> list[str]:
    """Refuses a domain of our names that is not ours, or ours and running; returns ours that
    are defined but shut off (left by a run that lost its state), for `up` to remove."""
    existing = set(list_domains(topology.uri))
    stale = []
    for host, name in domain_names(topology).items():
        if name not in existing:
            continue
        marker = marker_of(topology.uri, name)
        if not is_ours(marker, topology, state_dir):
            whose = (f"topology {marker.get('topology')!r} of {marker.get('state')}" if marker
                     else "someone else (it has no snaptier marker)")
            raise TestbedError(f"libvirt domain {name} already exists at {topology.uri}, defined by {whose}: "
                               f"rename this topology, or remove that domain ('virsh -c {topology.uri} undefine {name}' "
                               "once it is shut off)")
        state = domain_state(topology.uri, name)
        if state != "shut off":
            raise TestbedError(f"topology {topology.name!r} is already up: domain {name} is {state} "
                               "(use 'status', or 'down' first)")
        stale.append(name)
    return stale


def qemu_pid(tag: str) -> int | None:
    """The QEMU process carrying exactly `process=TAG` (domain_xml adds it to libvirt's -name)."""
    want = f"process={tag}"
    for pid in process.tagged_pids(tag):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(want == a or a.endswith("," + want) or a.startswith(want + ",") for a in args):
            return pid
    return None


def _wait_qemu_pid(spec: MachineSpec, uri: str) -> int:
    deadline = time.monotonic() + QEMU_PID_TIMEOUT
    while time.monotonic() < deadline:
        pid = qemu_pid(spec.tag)
        if pid:
            return pid
        time.sleep(0.2)
    raise TestbedError(f"{spec.name}: libvirt started domain {domain_name(spec)} but no QEMU process tagged "
                       f"process={spec.tag} appeared within {QEMU_PID_TIMEOUT} s (domain state: "
                       f"{domain_state(uri, domain_name(spec))})")


def root_overlay(spec: MachineSpec, state_dir: Path) -> Path:
    return state_dir / f"{spec.name}.root.qcow2"


def domain_file(spec: MachineSpec, state_dir: Path) -> Path:
    return state_dir / f"{spec.name}.domain.xml"


def make_overlay(spec: MachineSpec, overlay: Path) -> None:
    """libvirt has no snapshot=on: a fresh qcow2 over the cached image per boot, removed by `down`."""
    overlay.unlink(missing_ok=True)
    try:
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(spec.root_image),
                               str(overlay)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise TestbedError("qemu-img is not installed (qemu-utils; run 'make deps')") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"qemu-img did not create {overlay} within 60 s") from None
    if proc.returncode != 0:
        raise TestbedError(f"{spec.name}: qemu-img could not create the root overlay {overlay}: {_error(proc)}")


def emulator_path() -> str:
    found = shutil.which("qemu-system-x86_64")
    if not found:
        raise TestbedError("qemu-system-x86_64 is not installed (run 'make deps')")
    return str(Path(found).resolve())


def up(topology: Topology, image_dir: str | None = None, boot_timeout: float = 300) -> None:
    state_dir = state_dir_for(topology.name)
    refuse_running(topology, state_dir)
    # Before minutes of image building: libvirt answers, and no domain of our names is in the way.
    refuse_impossible(topology)
    stale = refuse_clashes(topology, state_dir)
    check_resources(topology, Runtime(repo=REPO, state_dir=state_dir, image_dir=Path("."), accel="tcg"))
    emulator = emulator_path()
    image = ensure_image(image_dir)
    for name in stale:
        say(f"removing domain {name}, left defined by an earlier run of this topology")
        _undefine(topology.uri, name)
    runtime, state = prepare_guests(topology, state_dir, image, backend="libvirt")

    def start_one(spec: MachineSpec) -> None:
        overlay = root_overlay(spec, state_dir)
        make_overlay(spec, overlay)
        xml = domain_file(spec, state_dir)
        xml.write_text(domain_xml(spec, overlay, topology.name, state_dir, emulator=emulator))
        name = domain_name(spec)
        proc = virsh(topology.uri, "define", str(xml))
        if proc.returncode != 0:
            raise TestbedError(f"{spec.name}: libvirt refused domain {name} ({xml}): {_error(proc)}")
        say(f"starting {spec.name} as libvirt domain {name} ({spec.role}, {spec.cpus} cpu, "
            f"{spec.memory // MiB} MiB{', cxl ' + spec.cxl.emulation if spec.cxl else ''}, {runtime.accel})")
        proc = virsh(topology.uri, "start", name)
        if proc.returncode != 0:
            raise TestbedError(f"{spec.name}: libvirt could not start domain {name}: {_error(proc)}")
        # The pidfile (and the tag in QEMU's command line) is how status, exec and the
        # boot wait see a host, whichever backend started it.
        spec.pidfile.write_text(f"{_wait_qemu_pid(spec, topology.uri)}\n")
    start_guests(topology, runtime, state, start_one, boot_timeout)


def _undefine(uri: str, name: str) -> None:
    proc = virsh(uri, "undefine", name)
    if proc.returncode != 0 and name in list_domains(uri):
        raise TestbedError(f"libvirt could not undefine domain {name}: {_error(proc)}")


def _destroy(uri: str, name: str) -> None:
    if domain_state(uri, name) not in ("shut off", "unknown"):
        proc = virsh(uri, "destroy", name)
        if proc.returncode != 0 and domain_state(uri, name) != "shut off":
            raise TestbedError(f"libvirt could not stop domain {name}: {_error(proc)}")


def down(topology: Topology, quiet: bool = False) -> int:
    """Destroys and undefines this topology's domains (named after it and carrying its marker),
    ends any QEMU still tagged with it, and removes the files `up` made."""
    state_dir = state_dir_for(topology.name)
    ours = []
    reachable = not preflight(topology)
    if reachable:
        # Also a host the topology file no longer lists: the marker, not the file, says whose it is.
        prefix = host_tag(topology.name, "")
        for name in list_domains(topology.uri):
            if name.startswith(prefix) and is_ours(marker_of(topology.uri, name), topology, state_dir):
                ours.append(name)
        def remove(name: str) -> None:
            if not quiet:
                say(f"stopping domain {name}")
            _destroy(topology.uri, name)
            _undefine(topology.uri, name)
        # Concurrently: each virsh call is bounded, so `down` takes as long as the slowest guest.
        with ThreadPoolExecutor(max_workers=max(1, len(ours))) as pool:
            list(pool.map(remove, ours))
    elif not quiet:
        say(f"libvirt at {topology.uri} does not answer: no domain can be undefined; ending this topology's "
            "QEMU processes and files only")
    # QEMUs libvirt lost track of (or all of them, when libvirt does not answer): by their tag.
    tag_prefix = f"snaptier-{topology.name}-"
    strays = process.tagged_pids(tag_prefix)
    for pid in strays:
        process.stop(pid, f"process={tag_prefix}")
    remove_volatile(topology, state_dir)
    for h in topology.hosts:
        for suffix in (".root.qcow2", ".domain.xml"):
            (state_dir / f"{h.name}{suffix}").unlink(missing_ok=True)
    if not quiet:
        say(f"topology {topology.name!r} is down ({len(ours)} domain{'s' if len(ours) != 1 else ''} removed"
            + (f", {len(strays)} stray QEMU process{'es' if len(strays) != 1 else ''} ended" if strays else "") + ")")
    return len(ours)
