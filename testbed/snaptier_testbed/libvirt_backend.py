"""Bringing a topology up and down as libvirt domains (backend = "libvirt"), on one machine or
several.

The same machines as the direct QEMU backend — one MachineSpec per host, translated by
qemu/snaptier_qemu/domain_xml.py instead of argv.py — defined and started through `virsh` at the
URI of the host's machine. Each machine is a machines.Place: this one directly, another over ssh,
with its own copies of the image and guest tree, run directory, switches and CXL backing files.
A link whose hosts are on several machines is a switch on each, cabled to the first host's
machine's switch over ssh. The same contract as launcher.py and native.py: `up` refuses a running
topology and undoes a half-made one, `down` is idempotent and removes exactly what `up` made (the
domains named snaptier-<topology>-<host> that carry this topology's marker, on every machine; the
cables, switches, overlays, CXL files and other machines' run directories), every virsh and ssh
call and every wait has a deadline.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from . import machines
from .launcher import (LocalWatch, TestbedError, check_resources, ensure_image, prepare_guests, refuse_running,
                       remove_volatile, say, wait_ready)
from .machine import MachineSpec, Runtime, cxl_backing, describe, host_tag
from .state import REPO, TestbedState, state_dir_for
from .topology import MiB, Topology

sys.path.insert(0, str(REPO / "qemu"))
from snaptier_qemu import process  # noqa: E402
from snaptier_qemu.domain_xml import domain_name, domain_xml, parse_metadata  # noqa: E402

VIRSH_TIMEOUT = 60       # one virsh call; `start` of a TCG guest returns in a few seconds
QEMU_PID_TIMEOUT = 30    # from `virsh start` returning to its QEMU being found by its tag
DAEMON_SCRIPT = "testbed/libvirt/daemon.sh"
# What the launcher runs on another machine (this machine's are checked by `make deps`).
REMOTE_TOOLS = ("qemu-system-x86_64", "qemu-img", "vde_switch", "vde_plug", "tar", "python3", "pgrep", "truncate")
OWNER_FILE = "owner"      # in a machine's run directory: the checkout (state directory) it belongs to
KEEP_TREES = 3            # guest trees kept on a machine, newest first (each checkout change makes one)
CABLE_SETTLE_S = 1.0      # a cable whose ssh fails ends within this; one still running is connected


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


def preflight(topology: Topology) -> list[str]:
    """What stops this topology from running from here, as sentences (empty: nothing): each
    machine reachable (ssh for another machine, with the tools the launcher runs there) and its
    libvirt answering."""
    problems = []
    for place in machines.places(topology, state_dir_for(topology.name)).values():
        why = machines.unreachable(place)
        if why:
            problems.append(why)
            continue
        if not place.local:
            missing = place.sh("for t in " + " ".join(REMOTE_TOOLS) + "; do command -v $t > /dev/null || echo $t; done")
            if missing.returncode != 0:
                problems.append(f"machine {place.name}: cannot look for the tools the launcher runs there "
                                f"({machines.error_of(missing)})")
                continue
            if missing.stdout.split():
                problems.append(f"machine {place.name} lacks {', '.join(missing.stdout.split())} (the launcher runs "
                                "them there: install qemu-system-x86, qemu-utils, vde2, python3 and procps on it)")
                continue
        uri = place.machine.uri
        try:
            proc = virsh(uri, "version", timeout=30)
        except TestbedError as e:
            problems.append(str(e))
            continue
        if proc.returncode != 0:
            hint = (f"start it with '{DAEMON_SCRIPT} start' (as root)" if uri == "qemu:///system" and place.local
                    else f"is a libvirt daemon running on machine {place.name}, and does 'virsh -c {uri} version' work from here?")
            problems.append(f"libvirt at {uri} does not answer ({machines.error_of(proc)}); {hint}")
    return problems


def refuse_impossible(topology: Topology) -> None:
    problems = preflight(topology)
    if problems:
        raise TestbedError("; ".join(problems))


def list_domains(uri: str) -> list[str]:
    proc = virsh(uri, "list", "--all", "--name")
    if proc.returncode != 0:
        raise TestbedError(f"cannot list the domains at {uri}: {machines.error_of(proc)}")
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
    """Refuses a domain of our names that is not ours, or ours and running, on the machine its
    host goes to; returns ours that are defined but shut off (left by a run that lost its
    state), for `up` to remove."""
    existing = {m.uri: set(list_domains(m.uri)) for m in topology.machines}
    stale = []
    for host, name in domain_names(topology).items():
        uri = topology.machine_of(host).uri
        if name not in existing[uri]:
            continue
        marker = marker_of(uri, name)
        if not is_ours(marker, topology, state_dir):
            whose = (f"topology {marker.get('topology')!r} of {marker.get('state')}" if marker
                     else "someone else (it has no snaptier marker)")
            raise TestbedError(f"libvirt domain {name} already exists at {uri}, defined by {whose}: "
                               f"rename this topology, or remove that domain ('virsh -c {uri} undefine {name}' "
                               "once it is shut off)")
        state = domain_state(uri, name)
        if state != "shut off":
            raise TestbedError(f"topology {topology.name!r} is already up: domain {name} is {state} "
                               "(use 'status', or 'down' first)")
        stale.append(name)
    return stale


def hosts_on(topology: Topology, place: machines.Place) -> list[str]:
    return [h.name for h in topology.hosts if h.machine == place.name]


def running_hosts(topology: Topology, state_dir: Path) -> dict[str, int]:
    """Hosts whose QEMU is alive and carries its tag, each looked for on its own machine (one
    round trip per machine); the pid is the machine's."""
    running = {}
    for place in machines.places(topology, state_dir).values():
        names = hosts_on(topology, place)
        pids = {n: pid for n in names if (pid := process.read_pid(state_dir / f"{n}.pid"))}
        tags = {n: host_tag(topology.name, n) for n in names}
        running.update({n: pids[n] for n in machines.alive(place, pids, tags)})
    return running


class MachineWatch(LocalWatch):
    """The boot wait's view of guests wherever they run: status file, QEMU and serial log on the
    guest's own machine."""
    def __init__(self, runtime: Runtime, topology: Topology, all_places: dict[str, machines.Place],
                 state: TestbedState):
        super().__init__(runtime)
        self.topology, self.places, self.state = topology, all_places, state

    def _place(self, spec: MachineSpec) -> machines.Place:
        return machines.place_of(self.topology, self.places, spec.name)

    def status_text(self, spec: MachineSpec) -> str | None:
        place = self._place(spec)
        return place.read_text(place.root / "share" / "status" / f"{spec.name}.json")

    def alive(self, spec: MachineSpec) -> bool:
        pid = process.read_pid(self.runtime.state_dir / f"{spec.name}.pid")
        return bool(pid) and spec.name in machines.alive(self._place(spec), {spec.name: pid}, {spec.name: spec.tag})

    def console_tail(self, spec: MachineSpec, lines: int = 10) -> list[str]:
        text = self._place(spec).read_text(spec.console_log)
        return text.splitlines()[-lines:] if text else []

    def ssh_via(self, spec: MachineSpec) -> list | None:
        return self.state.ssh_via.get(spec.name)


def _wait_qemu_pid(place: machines.Place, spec: MachineSpec, uri: str) -> int:
    deadline = time.monotonic() + QEMU_PID_TIMEOUT
    while time.monotonic() < deadline:
        pid = machines.pid_of(place, spec.tag)
        if pid:
            return pid
        time.sleep(0.2)
    raise TestbedError(f"{spec.name}: libvirt started domain {domain_name(spec)} on machine {place.name} but no QEMU "
                       f"process tagged process={spec.tag} appeared there within {QEMU_PID_TIMEOUT} s (domain state: "
                       f"{domain_state(uri, domain_name(spec))})")


def root_overlay(spec: MachineSpec, state_dir: Path) -> Path:
    """On the host's machine: `state_dir` is that machine's run directory."""
    return state_dir / f"{spec.name}.root.qcow2"


def domain_file(spec: MachineSpec, state_dir: Path) -> Path:
    """Here (virsh reads the XML on this side and sends it to the machine's libvirt)."""
    return state_dir / f"{spec.name}.domain.xml"


def make_overlay(place: machines.Place, spec: MachineSpec, overlay: Path) -> None:
    """libvirt has no snapshot=on: a fresh qcow2 over the cached image per boot, removed by `down`."""
    q = shlex.quote
    place.must(f"command -v qemu-img > /dev/null || {{ echo 'qemu-img is not installed (qemu-utils)' >&2; exit 1; }}; "
               f"rm -f {q(str(overlay))} && qemu-img create -q -f qcow2 -F raw -b {q(str(spec.root_image))} {q(str(overlay))}",
               f"{spec.name}: creating the root overlay {overlay}")


def emulator_path(place: machines.Place) -> str:
    out = place.sh('p=$(command -v qemu-system-x86_64) && readlink -f "$p"')
    if out.returncode != 0 or not out.stdout.strip():
        raise TestbedError(f"qemu-system-x86_64 is not installed on machine {place.name} (run 'make deps' there)")
    return out.stdout.strip()


def _check_resources(topology: Topology, all_places: dict[str, machines.Place]) -> None:
    """Each machine has the RAM for its guests and the /dev/shm room for its CXL backing files."""
    runtime = Runtime(repo=REPO, state_dir=Path("."), image_dir=Path("."), accel="tcg")
    for place in all_places.values():
        names = set(hosts_on(topology, place))
        devices = [d for d in topology.cxl if d.hosts[0] in names]
        if place.local:
            check_resources(replace(topology, hosts=tuple(h for h in topology.hosts if h.name in names),
                                    cxl=tuple(devices)), runtime)
            continue
        out = place.must("awk '/^MemAvailable:/ {print $2}' /proc/meminfo; df -B1 --output=avail /dev/shm | tail -1",
                         "reading its free memory")
        kib, shm_free = (int(v) for v in out.split()[:2])
        avail = kib * 1024
        need = sum(h.memory for h in topology.hosts if h.name in names)
        shm = sum(d.size for d in devices if str(cxl_backing(topology, d.name, runtime)).startswith("/dev/shm"))
        if need + shm > avail:
            raise TestbedError(f"machine {place.name}: its guests and CXL backing need {(need + shm) // MiB} MiB of RAM "
                               f"but only {avail // MiB} MiB is available there")
        if shm > shm_free:
            raise TestbedError(f"machine {place.name}: /dev/shm has {shm_free // MiB} MiB free there; the CXL backing "
                               f"files need {shm // MiB} MiB")


def _prepare_place(topology: Topology, place: machines.Place, runtime: Runtime, image: Path,
                   tree: tuple[list[str], str] | None) -> Runtime:
    """The launch files of one machine: here the checkout's; on another machine a copy of the
    image and of the guest tree (once per content), and the topology's run directory there with
    the guests' ssh key in its share."""
    if place.local:
        return runtime
    q = shlex.quote
    machines.cached_copy(place, image, list(machines.IMAGE_FILES), machines.image_key(image), "the guest image")
    assert tree is not None, "another machine needs the guest tree"
    files, key = tree
    machines.cached_copy(place, REPO, files, machines.tree_key(key), "the guest tree (checkout and guest build)",
                         keep=KEEP_TREES)
    root, owner = place.root, str(runtime.state_dir)
    place.must(f"o=$(cat {q(str(root / OWNER_FILE))} 2>/dev/null || true); "
               f"if [ -n \"$o\" ] && [ \"$o\" != {q(owner)} ]; then echo \"{root} belongs to the checkout of $o\" >&2; exit 3; fi; "
               f"mkdir -p {q(str(root / 'share' / 'status'))} && rm -f {q(str(root / 'share' / 'status'))}/*.json && "
               f"printf '%s\\n' {q(owner)} > {q(str(root / OWNER_FILE))}", f"preparing {root}")
    machines.push(place, runtime.state_dir / "share", ["ssh/authorized_keys"], root / "share", timeout=120)
    return place.runtime_for(runtime, image, key)


def push_share(topology: Topology, relpaths: list[str]) -> None:
    """Files the launcher wrote into the share here (agent configs), to every other machine's
    copy of it, where those guests read /shared."""
    state_dir = state_dir_for(topology.name)
    for place in machines.places(topology, state_dir).values():
        if not place.local:
            machines.push(place, state_dir / "share", relpaths, place.root / "share", timeout=120)


def _start_cxl(topology: Topology, all_places: dict[str, machines.Place], runtime: Runtime) -> None:
    for dev in topology.cxl:
        place = machines.place_of(topology, all_places, dev.hosts[0])
        path = shlex.quote(str(cxl_backing(topology, dev.name, runtime)))
        # A fresh, zeroed device on every up: CXL memory is volatile.
        place.must(f"rm -f {path} && truncate -s {dev.size} {path}", f"creating the backing file of cxl {dev.name}")


def switch_files(root: Path, link: str) -> tuple[Path, Path, Path]:
    """A link's switch on one machine: socket directory, management socket, pidfile."""
    return root / f"switch-{link}", root / f"switch-{link}.mgmt", root / f"switch-{link}.pid"


def _start_switch(place: machines.Place, link: str) -> int:
    sock, mgmt, pidfile = (shlex.quote(str(p)) for p in switch_files(place.root, link))
    log = shlex.quote(str(place.root / f"switch-{link}.log"))
    out = place.must(
        f"rm -rf {sock} {mgmt} {pidfile}; "
        f"vde_switch --sock {sock} --mgmt {mgmt} --mode 0600 --daemon --pidfile {pidfile} < /dev/null > {log} 2>&1 "
        f"|| {{ cat {log} >&2; exit 1; }}; "
        f"for i in $(seq 100); do if [ -s {pidfile} ] && [ -e {sock}/ctl ]; then cat {pidfile}; exit 0; fi; sleep 0.05; done; "
        "echo 'no control socket after 5 s' >&2; exit 1", f"starting the switch of link {link}", timeout=30)
    return int(out.split()[0])


def link_places(topology: Topology, all_places: dict[str, machines.Place], link) -> list[machines.Place]:
    """The machines with hosts on a link, the first host's first: its switch is the hub the
    others' switches are cabled to."""
    seen: list[machines.Place] = []
    for h in link.hosts:
        place = machines.place_of(topology, all_places, h)
        if place not in seen:
            seen.append(place)
    return seen


def cable_argv(link: str, hub: machines.Place, other: machines.Place) -> list[str]:
    """One VDE cable between a link's switches on two machines: dpipe joins a vde_plug into each
    (over ssh where the switch is on another machine), Ethernet frames as a stream between them."""
    plug = lambda place: place.command(["vde_plug", str(switch_files(place.root, link)[0])])  # noqa: E731
    return ["dpipe", *plug(hub), "=", *plug(other)]


def cable_pidfile(state_dir: Path, link: str, other: machines.Place) -> Path:
    return state_dir / f"cable-{link}-{other.name}.pid"


# A cable that breaks (the ssh between the machines drops) is plugged in again: the guests see a
# link that went down and came back, and RDMA's own retries and the agent's reconnects take over.
CABLE_LOOP = ('while :; do "$@"; echo "cable ended (exit $?), reconnecting in 1 s" >&2; sleep 1; done')


def _start_cable(state_dir: Path, link: str, hub: machines.Place, other: machines.Place) -> int:
    """The cable as a session of its own (its loop, dpipe, both vde_plugs, the ssh), here."""
    log_path = state_dir / f"cable-{link}-{other.name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["sh", "-c", CABLE_LOOP, f"snaptier-cable-{link}", *cable_argv(link, hub, other)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    cable_pidfile(state_dir, link, other).write_text(f"{proc.pid}\n")
    time.sleep(CABLE_SETTLE_S)
    said = log_path.read_text(errors="replace").strip()
    if proc.poll() is not None or "cable ended" in said:
        raise TestbedError(f"the cable of link {link} between machines {hub.name} and {other.name} does not hold: "
                           + (said or f"exit {proc.returncode}"))
    return proc.pid


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop_cables(topology: Topology, state_dir: Path, all_places: dict[str, machines.Place]) -> int:
    """Ends this topology's cables (by pidfile, each checked against its command line): every
    process of the cable's session (its loop, dpipe, the vde_plugs and the ssh)."""
    stopped = 0
    for link in topology.links:
        for other in all_places.values():
            pidfile = cable_pidfile(state_dir, link.name, other)
            pid = process.read_pid(pidfile)
            marker = str(switch_files(other.root, link.name)[0])
            if pid and f"snaptier-cable-{link.name} dpipe " in process.cmdline_of(pid) and marker in process.cmdline_of(pid):
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    members = _session_pids(pid)
                    for member in members:
                        try:
                            os.kill(member, sig)
                        except ProcessLookupError:
                            pass
                    if all(process.wait_gone(m, 5) for m in members):
                        break
                stopped += 1
            pidfile.unlink(missing_ok=True)
            (state_dir / f"cable-{link.name}-{other.name}.log").unlink(missing_ok=True)
    return stopped


def _start_links(topology: Topology, all_places: dict[str, machines.Place], state: TestbedState,
                 state_dir: Path) -> None:
    """Per link, a switch on every machine with hosts on it, the others cabled to the first's."""
    for link in topology.links:
        on = link_places(topology, all_places, link)
        for place in on:
            pid = _start_switch(place, link.name)
            if place.local:
                state.switches[link.name] = pid
                state.save(state_dir)
        for other in on[1:]:
            _start_cable(state_dir, link.name, on[0], other)
            say(f"link {link.name}: machine {other.name}'s switch cabled to machine {on[0].name}'s")


def up(topology: Topology, image_dir: str | None = None, boot_timeout: float = 300) -> None:
    state_dir = state_dir_for(topology.name)
    refuse_running(topology, state_dir)
    # Before minutes of image building: every machine and its libvirt answer, no domain of our
    # names is in the way, and each machine has room for its guests.
    refuse_impossible(topology)
    all_places = machines.places(topology, state_dir)
    stale = refuse_clashes(topology, state_dir)
    _check_resources(topology, all_places)
    image = ensure_image(image_dir)
    uri_of = {name: topology.machine_of(host).uri for host, name in domain_names(topology).items()}
    for name in stale:
        say(f"removing domain {name}, left defined by an earlier run of this topology")
        _undefine(uri_of[name], name)
    ports: dict[str, int] = {}
    via: dict[str, list] = {}
    for place in all_places.values():
        names = hosts_on(topology, place)
        ports.update(zip(names, machines.free_ports(place, len(names))))
        if not place.local:
            via.update({n: [place.machine.ssh.destination, place.machine.ssh.port] for n in names})
    runtime, state = prepare_guests(topology, state_dir, image, backend="libvirt", ssh_ports=ports, ssh_via=via)
    try:
        # What guests on other machines mount at /opt/snaptier, listed and hashed once.
        tree = machines.guest_tree(REPO) if any(not p.local for p in all_places.values()) else None
        runtimes = {name: _prepare_place(topology, place, runtime, image, tree) for name, place in all_places.items()}
        specs = []
        for h in topology.hosts:
            specs += [s for s in describe(topology, runtimes[h.machine]) if s.name == h.name]
        for name in ports:
            (state_dir / f"{name}.pid").unlink(missing_ok=True)
        _start_cxl(topology, all_places, runtime)
        _start_links(topology, all_places, state, state_dir)
        emulators = {name: emulator_path(place) for name, place in all_places.items()}
        for spec in specs:
            place = machines.place_of(topology, all_places, spec.name)
            uri = place.machine.uri
            place.must(f"rm -f {shlex.quote(str(spec.console_log))} {shlex.quote(str(spec.console_socket))}",
                       f"clearing {spec.name}'s console")
            overlay = root_overlay(spec, place.root)
            make_overlay(place, spec, overlay)
            xml = domain_file(spec, state_dir)
            xml.write_text(domain_xml(spec, overlay, topology.name, state_dir, emulator=emulators[place.name],
                                      machine=place.name))
            name = domain_name(spec)
            proc = virsh(uri, "define", str(xml))
            if proc.returncode != 0:
                raise TestbedError(f"{spec.name}: libvirt refused domain {name} ({xml}): {machines.error_of(proc)}")
            where = f" on machine {place.name}" if len(all_places) > 1 else ""
            say(f"starting {spec.name} as libvirt domain {name}{where} ({spec.role}, {spec.cpus} cpu, "
                f"{spec.memory // MiB} MiB{', cxl ' + spec.cxl.emulation if spec.cxl else ''}, {runtime.accel})")
            proc = virsh(uri, "start", name)
            if proc.returncode != 0:
                raise TestbedError(f"{spec.name}: libvirt could not start domain {name}: {machines.error_of(proc)}")
            # The pidfile here (and the tag in QEMU's command line) is how status, exec and the
            # boot wait see a host, whichever backend started it and wherever it runs.
            (state_dir / f"{spec.name}.pid").write_text(f"{_wait_qemu_pid(place, spec, uri)}\n")
        wait_ready(topology, specs, runtime, boot_timeout, watch=MachineWatch(runtime, topology, all_places, state))
    except BaseException:
        say("start-up failed: removing what was made")
        down(topology, quiet=True)
        raise


def _undefine(uri: str, name: str) -> None:
    proc = virsh(uri, "undefine", name)
    if proc.returncode != 0 and name in list_domains(uri):
        raise TestbedError(f"libvirt could not undefine domain {name}: {machines.error_of(proc)}")


def _destroy(uri: str, name: str) -> None:
    if domain_state(uri, name) not in ("shut off", "unknown"):
        proc = virsh(uri, "destroy", name)
        if proc.returncode != 0 and domain_state(uri, name) != "shut off":
            raise TestbedError(f"libvirt could not stop domain {name}: {machines.error_of(proc)}")


def _clean_remote(topology: Topology, place: machines.Place, state_dir: Path, tag_prefix: str) -> int:
    """Another machine after its domains are gone: stray QEMUs of this topology, its switches,
    its CXL backing files, and its run directory (only if this checkout owns it)."""
    q = shlex.quote
    runtime = Runtime(repo=REPO, state_dir=place.root, image_dir=Path("."), accel="tcg")
    names = set(hosts_on(topology, place))
    backings = " ".join(q(str(cxl_backing(topology, d.name, runtime))) for d in topology.cxl if d.hosts[0] in names)
    stops = "".join(
        f"p=$(cat {q(str(pidfile))} 2>/dev/null) && tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -qF -- {q('--mgmt ' + str(mgmt) + ' ')} "
        f"&& kill $p; " for _, mgmt, pidfile in (switch_files(place.root, l.name) for l in topology.links))
    root = q(str(place.root))
    out = place.sh(
        f"n=0; for p in $(pgrep -f -- {q('[p]rocess=' + tag_prefix)}); do kill $p && n=$((n+1)); done; "
        f"{stops}"
        f"{'rm -f ' + backings + '; ' if backings else ''}"
        f"if [ \"$(cat {root}/{OWNER_FILE} 2>/dev/null)\" = {q(str(state_dir))} ]; then rm -rf {root}; "
        f"elif [ -e {root} ]; then echo \"{place.root} is not this checkout's: left\" >&2; fi; echo $n", timeout=60)
    if out.returncode != 0 or out.stderr.strip():
        say(f"machine {place.name}: {machines.error_of(out)}")
    return int(out.stdout.split()[-1]) if out.stdout.split() and out.stdout.split()[-1].isdigit() else 0


def down(topology: Topology, quiet: bool = False) -> int:
    """Destroys and undefines this topology's domains (named after it and carrying its marker)
    on every machine, ends any QEMU still tagged with it, its cables and switches, and removes
    the files `up` made here and there."""
    state_dir = state_dir_for(topology.name)
    all_places = machines.places(topology, state_dir)
    prefix = host_tag(topology.name, "")
    ours: list[tuple[str, str]] = []
    reachable: list[machines.Place] = []
    for place in all_places.values():
        uri = place.machine.uri
        problem = machines.unreachable(place)
        if problem is None:
            try:
                answers = virsh(uri, "version", timeout=30).returncode == 0
            except TestbedError:
                answers = False
            problem = None if answers else f"libvirt at {uri} does not answer"
        if problem:
            if not quiet:
                say(f"{problem}: no domain can be undefined there; ending this topology's processes and files only")
            continue
        reachable.append(place)
        # Also a host the topology file no longer lists: the marker, not the file, says whose it
        # is, and on which machine (two URIs can reach one libvirt: each domain is removed once).
        for name in list_domains(uri):
            if not name.startswith(prefix) or name in {n for _, n in ours}:
                continue
            marker = marker_of(uri, name)
            if is_ours(marker, topology, state_dir) and marker.get("machine", place.name) == place.name:
                ours.append((uri, name))

    def remove(item: tuple[str, str]) -> None:
        uri, name = item
        if not quiet:
            say(f"stopping domain {name}" + (f" at {uri}" if len(all_places) > 1 else ""))
        _destroy(uri, name)
        _undefine(uri, name)
    # Concurrently: each virsh call is bounded, so `down` takes as long as the slowest guest.
    with ThreadPoolExecutor(max_workers=max(1, len(ours))) as pool:
        list(pool.map(remove, ours))
    _stop_cables(topology, state_dir, all_places)
    strays = 0
    for place in reachable:
        if not place.local:
            strays += _clean_remote(topology, place, state_dir, prefix)
    # QEMUs libvirt lost track of (or all of them, when libvirt does not answer): by their tag.
    local_strays = process.tagged_pids(prefix)
    for pid in local_strays:
        process.stop(pid, f"process={prefix}")
    strays += len(local_strays)
    local_hosts = {h.name for h in topology.hosts if all_places[h.machine].local}
    remove_volatile(topology, state_dir, cxl_devices={d.name for d in topology.cxl if d.hosts[0] in local_hosts})
    for h in topology.hosts:
        for suffix in (".root.qcow2", ".domain.xml"):
            (state_dir / f"{h.name}{suffix}").unlink(missing_ok=True)
    for link in topology.links:
        (state_dir / f"switch-{link.name}.log").unlink(missing_ok=True)
    if not quiet:
        say(f"topology {topology.name!r} is down ({len(ours)} domain{'s' if len(ours) != 1 else ''} removed"
            + (f", {strays} stray QEMU process{'es' if strays != 1 else ''} ended" if strays else "") + ")")
    return len(ours)
