"""Topology -> machine descriptions: what each host is, independent of how it is launched.

A MachineSpec says "2 GiB, one CXL device backed by this file, a NIC on switch data0 with this
MAC, these shares, this kernel command line". The QEMU backend (qemu/snaptier_qemu) turns it
into a command line; the libvirt backend (qemu/snaptier_qemu/domain_xml.py) turns the same spec
into domain XML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .topology import MiB, Topology


@dataclass(frozen=True)
class Share:
    tag: str          # 9p mount tag the guest mounts by
    path: Path
    readonly: bool


@dataclass(frozen=True)
class Nic:
    id: str
    mac: str
    kind: str                         # "switch" (guest-to-guest segment) or "user" (host access)
    switch: Path | None = None        # kind == "switch": the segment's control socket
    forwards: tuple[tuple[str, int, int], ...] = ()  # kind == "user": (host addr, host port, guest port)


@dataclass(frozen=True)
class CxlAttach:
    device: str        # topology name of the shared device
    emulation: str     # "type3" | "nvdimm"
    backing: Path      # the one file every attached host maps (multi-headed)
    size: int
    formats: bool      # nvdimm: this host creates the namespace, the others find it


@dataclass(frozen=True)
class MachineSpec:
    name: str
    role: str
    cpus: int
    memory: int
    accel: str                 # "tcg" | "kvm" | "kvm-then-tcg"
    kernel: Path
    initrd: Path
    root_image: Path
    cmdline: tuple[str, ...]
    shares: tuple[Share, ...]
    nics: tuple[Nic, ...]
    cxl: CxlAttach | None
    console_socket: Path
    console_log: Path
    qmp_socket: Path
    pidfile: Path
    tag: str                   # identifies processes of this topology (process name, cleanup)


@dataclass(frozen=True)
class Runtime:
    """Everything a launch needs that is not in the topology file."""
    repo: Path
    state_dir: Path
    image_dir: Path
    accel: str                                   # resolved: "tcg" | "kvm-then-tcg"
    ssh_ports: dict[str, int] = field(default_factory=dict)
    shm_dir: Path = Path("/dev/shm")
    boot_id: str = "0"


def data_mac(link_index: int, host_index: int) -> str:
    return f"52:54:00:5e:{link_index:02x}:{host_index + 1:02x}"


def mgmt_mac(host_index: int) -> str:
    return f"52:54:00:ad:00:{host_index + 1:02x}"


# Native hosts map their CXL file in place: it lives on a tmpfs of the topology's own, with huge
# pages (native.py mounts it), rather than in /dev/shm.
NATIVE_CXL_ROOT = Path("/run/snaptier-native")


def native_cxl_dir(topology: Topology) -> Path:
    return NATIVE_CXL_ROOT / topology.name


def cxl_backing(topology: Topology, device_name: str, runtime: Runtime) -> Path:
    dev = next(c for c in topology.cxl if c.name == device_name)
    if dev.backing:
        return Path(dev.backing)
    if topology.backend == "native":
        return native_cxl_dir(topology) / f"snaptier-{topology.name}-{dev.name}.raw"
    return runtime.shm_dir / f"snaptier-{topology.name}-{dev.name}.raw"


def host_tag(topology_name: str, host: str) -> str:
    """snaptier-<topology>-<host>: the process tag of a host, and its libvirt domain name."""
    return f"snaptier-{topology_name}-{host}"


def switch_socket(runtime: Runtime, link_name: str) -> Path:
    return runtime.state_dir / f"switch-{link_name}"


def describe(topology: Topology, runtime: Runtime) -> list[MachineSpec]:
    peers = []
    for link in topology.links:
        peers += [f"{h}:{link.address_of(h).ip}" for h in link.hosts]
    specs = []
    for index, host in enumerate(topology.hosts):
        cmdline = [
            "console=ttyS0", "root=/dev/vda", "rw", "init=/usr/lib/snaptier/init",
            "net.ifnames=0", "quiet", "panic=-1",
            f"snaptier.host={host.name}", f"snaptier.role={host.role}",
            f"snaptier.boot={runtime.boot_id}",
            f"snaptier.mgmt={mgmt_mac(index)}",
        ]
        nics = [Nic(id="mgmt", mac=mgmt_mac(index), kind="user",
                    forwards=(("127.0.0.1", runtime.ssh_ports.get(host.name, 0), 22),))]
        link = topology.link_of(host.name)
        if link:
            link_index = topology.links.index(link)
            mac = data_mac(link_index, link.hosts.index(host.name))
            nics.append(Nic(id=link.name, mac=mac, kind="switch", switch=switch_socket(runtime, link.name)))
            cmdline.append(f"snaptier.data={mac},{link.address_of(host.name)}")
            if link.rdma:
                cmdline.append("snaptier.rxe=1")
        if peers:
            cmdline.append("snaptier.peers=" + ";".join(peers))
        cxl = None
        dev = topology.cxl_of(host.name)
        if dev:
            formats = dev.hosts[0] == host.name
            cxl = CxlAttach(device=dev.name, emulation=dev.emulation, backing=cxl_backing(topology, dev.name, runtime),
                            size=dev.size, formats=formats)
            cmdline.append(f"snaptier.cxl={dev.emulation}")
            if formats:
                cmdline.append("snaptier.cxl_format=1")
        if host.role == "memory":
            cmdline.append(f"snaptier.pool={host.pool // MiB}M")
        st = runtime.state_dir
        specs.append(MachineSpec(
            name=host.name, role=host.role, cpus=host.cpus, memory=host.memory, accel=runtime.accel,
            kernel=runtime.image_dir / "vmlinuz", initrd=runtime.image_dir / "initrd.img",
            root_image=runtime.image_dir / "root.img", cmdline=tuple(cmdline),
            shares=(Share("snaptier", runtime.repo, True), Share("shared", st / "share", False)),
            nics=tuple(nics), cxl=cxl,
            console_socket=st / f"{host.name}.console", console_log=st / f"{host.name}.serial.log",
            qmp_socket=st / f"{host.name}.qmp", pidfile=st / f"{host.name}.pid",
            tag=host_tag(topology.name, host.name),
        ))
    return specs


# ---------------------------------------------------------------- native hosts (containers)
NATIVE_DATA_IFACE = "eth0"
NATIVE_CXL_DEVICE = "/dev/cxl0"   # where a native host finds its CXL file (its "device")


@dataclass(frozen=True)
class Bind:
    source: Path
    target: str        # absolute path inside the host
    readonly: bool


@dataclass(frozen=True)
class Port:
    """A host's attachment to a link: a veth pair from the host's network namespace into the
    link's switch namespace (a bridge)."""
    link: str
    switch_netns: str
    switch_port: str   # the veth end in the switch namespace
    iface: str         # the veth end in the host
    mac: str
    address: str       # ADDR/PREFIX


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    role: str
    rootfs: Path
    netns: str                      # the host's network namespace (`ip netns` name)
    ports: tuple[Port, ...]
    binds: tuple[Bind, ...]
    params: tuple[tuple[str, str], ...]  # SNAPTIER_* for the host's init units
    params_file: Path
    hosts_file: Path                # the host's /etc/hosts: every peer by name
    scratch: Path                   # an empty directory: the host's tmpfs for its root's writes
    state: Path                     # the host's /var/lib/snaptier (agent state, file tier) on disk
    console_log: Path
    pidfile: Path
    tag: str


def native_netns(topology: Topology, host: str) -> str:
    return f"snaptier-{topology.name}-host-{host}"


def native_switch_netns(topology: Topology, link: str) -> str:
    return f"snaptier-{topology.name}-link-{link}"


def describe_native(topology: Topology, runtime: Runtime, rootfs: Path) -> list[ContainerSpec]:
    """Each host a set of namespaces over the guests' root file system: the same shares as the
    guests (/opt/snaptier read-only, /shared), its CXL file, one veth per link."""
    st = runtime.state_dir
    specs = []
    for host in topology.hosts:
        hdir = st / "hosts" / host.name
        params = [("SNAPTIER_HOST", host.name), ("SNAPTIER_ROLE", host.role), ("SNAPTIER_BOOT", runtime.boot_id)]
        binds = [Bind(runtime.repo, "/opt/snaptier", True), Bind(st / "share", "/shared", False),
                 Bind(runtime.repo / "guests/overlay/usr/lib/snaptier", "/usr/lib/snaptier", True),
                 Bind(hdir / "hosts", "/etc/hosts", True),
                 # The agent's state and file tier on this machine's disk, as on a guest's root disk.
                 Bind(hdir / "state", "/var/lib/snaptier", False)]
        ports = []
        link = topology.link_of(host.name)
        if link:
            link_index = topology.links.index(link)
            host_index = link.hosts.index(host.name)
            port = Port(link=link.name, switch_netns=native_switch_netns(topology, link.name),
                        switch_port=f"h{host_index}", iface=NATIVE_DATA_IFACE,
                        mac=data_mac(link_index, host_index), address=str(link.address_of(host.name)))
            ports.append(port)
            params.append(("SNAPTIER_DATA", f"{port.iface},{port.address}"))
            if link.rdma:
                params.append(("SNAPTIER_RXE", "1"))
        dev = topology.cxl_of(host.name)
        if dev:
            binds.append(Bind(cxl_backing(topology, dev.name, runtime), NATIVE_CXL_DEVICE, False))
            params += [("SNAPTIER_CXL", "shm"), ("SNAPTIER_CXL_DEVICE", NATIVE_CXL_DEVICE),
                       ("SNAPTIER_CXL_SIZE", str(dev.size))]
        if host.role == "memory":
            params.append(("SNAPTIER_POOL", f"{host.pool // MiB}M"))
        specs.append(ContainerSpec(
            name=host.name, role=host.role, rootfs=rootfs, netns=native_netns(topology, host.name),
            ports=tuple(ports), binds=tuple(binds), params=tuple(params), params_file=hdir / "params",
            hosts_file=hdir / "hosts", scratch=hdir / "scratch", state=hdir / "state", console_log=st / f"{host.name}.console.log", pidfile=st / f"{host.name}.pid",
            tag=f"snaptier-{topology.name}-{host.name}"))
    return specs


def hosts_file_text(topology: Topology) -> str:
    lines = ["127.0.0.1 localhost"]
    for link in topology.links:
        lines += [f"{link.address_of(h).ip} {h}" for h in link.hosts]
    return "\n".join(lines) + "\n"
