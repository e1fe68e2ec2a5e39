"""The topology file (TOML), parsed at the edge into typed, validated dataclasses.

Every error names the offending key (``host[1].memory``) so a user can fix the file without
reading this code. The reference is docs/testbed.md.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1 << 20
GiB = 1 << 30

ROLES = ("compute", "memory")
BACKENDS = ("qemu", "native", "libvirt")
# Backends whose hosts are QEMU guests booting the guest image (started directly, or by libvirt).
GUEST_BACKENDS = ("qemu", "libvirt")
# How each backend can present a CXL device: QEMU emulates a device (a type-3 device or the
# nvdimm stand-in); native hosts map one shared-memory file ("shm").
EMULATIONS = {"qemu": ("type3", "nvdimm"), "libvirt": ("type3", "nvdimm"), "native": ("shm",)}
DEFAULT_LIBVIRT_URI = "qemu:///system"
# Where the testbed keeps a remote machine's copies (image, guest tree) and run files.
DEFAULT_REMOTE_DIR = "/var/lib/snaptier-testbed"
# A libvirt QEMU driver URI: qemu[+transport]://[host]/system|session[?params].
LIBVIRT_URI_RE = re.compile(r"^qemu(\+[a-z0-9]+)?://[^/\s]*/(system|session)(\?\S*)?$")
ACCELS = ("auto", "kvm", "tcg")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
CXL_DIRECTORY_HEADER = Path(__file__).resolve().parents[2] / "tier-agent/include/snaptier/cxl_directory.hpp"


def max_cxl_hosts(header: Path = CXL_DIRECTORY_HEADER) -> int:
    """Host slots in the agent's shared CXL directory: the agent's own constant, read from its header."""
    m = re.search(r"kCxlMaxHosts\s*=\s*(\d+)", header.read_text())
    if not m:
        raise RuntimeError(f"{header}: no kCxlMaxHosts constant (the agent's CXL directory header changed)")
    return int(m.group(1))


class TopologyError(ValueError):
    """A topology file that cannot be used, with a message naming the key."""


@dataclass(frozen=True)
class Host:
    name: str
    role: str
    cpus: int = 1
    memory: int = 2 * GiB
    pool: int = 0  # memory nodes: bytes lent to the RDMA pool
    machine: str | None = None  # backend = "libvirt": the machine it runs on


@dataclass(frozen=True)
class SshTarget:
    """How the launcher reaches a machine named in a libvirt URI (qemu+ssh://USER@HOST:PORT/...)."""
    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


@dataclass(frozen=True)
class Machine:
    """A machine a libvirt topology places hosts on: the libvirt connection that reaches it.
    A URI naming a host (qemu+ssh://root@HOST/system) is another machine, reached by ssh, with
    the testbed's files for it under `dir` there; a URI without one is this machine."""
    name: str
    uri: str
    ssh: SshTarget | None = None
    dir: str = DEFAULT_REMOTE_DIR

    @property
    def remote(self) -> bool:
        return self.ssh is not None


@dataclass(frozen=True)
class CxlDevice:
    name: str
    emulation: str
    size: int
    hosts: tuple[str, ...]
    backing: str | None = None  # default: /dev/shm/snaptier-<topology>-<name>.raw


@dataclass(frozen=True)
class Link:
    name: str
    subnet: ipaddress.IPv4Network
    hosts: tuple[str, ...]
    rdma: bool = True

    def address_of(self, host: str) -> ipaddress.IPv4Interface:
        """Hosts get consecutive addresses from .1 in the order the link lists them."""
        index = self.hosts.index(host)
        return ipaddress.IPv4Interface(f"{self.subnet.network_address + 1 + index}/{self.subnet.prefixlen}")


@dataclass(frozen=True)
class Topology:
    name: str
    accel: str
    hosts: tuple[Host, ...]
    cxl: tuple[CxlDevice, ...] = ()
    links: tuple[Link, ...] = ()
    backend: str = "qemu"
    # backend = "libvirt": the machines, each host on one (a topology without [[machine]] tables
    # has one, named "local", at its `uri`).
    machines: tuple[Machine, ...] = ()
    source: Path | None = field(default=None, compare=False)

    @property
    def uri(self) -> str | None:
        """The libvirt connection of a topology on one machine (None: not libvirt)."""
        return self.machines[0].uri if self.machines else None

    def machine_of(self, host: str) -> Machine | None:
        name = self.host(host).machine
        return next((m for m in self.machines if m.name == name), None)

    @property
    def guests(self) -> bool:
        """Its hosts are QEMU guests (their own kernel, /dev/shm, devices), however started."""
        return self.backend in GUEST_BACKENDS

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def cxl_of(self, host: str) -> CxlDevice | None:
        return next((c for c in self.cxl if host in c.hosts), None)

    def link_of(self, host: str) -> Link | None:
        return next((l for l in self.links if host in l.hosts), None)


def parse_size(value: object, key: str) -> int:
    """'512M', '2G', '1T', '4096K' or a whole number of bytes."""
    if isinstance(value, bool):
        raise TopologyError(f"{key}: expected a size such as '512M' or '2G', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
        if not m:
            raise TopologyError(f"{key}: cannot read {value!r} as a size (use e.g. '512M', '2G')")
        n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    else:
        raise TopologyError(f"{key}: expected a size such as '512M' or '2G', got {value!r}")
    if n <= 0:
        raise TopologyError(f"{key}: size must be positive, got {value!r}")
    return n


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TopologyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _require(table: dict, key: str, where: str):
    if key not in table:
        raise TopologyError(f"{where}: missing required key {key!r}")
    return table[key]


def _str(value: object, key: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise TopologyError(f"{key}: expected a string, got {value!r}")
    if choices and value not in choices:
        raise TopologyError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _name(value: object, key: str) -> str:
    name = _str(value, key)
    if not NAME_RE.match(name):
        raise TopologyError(f"{key}: {name!r} is not a valid name (lowercase letters, digits, '-', start with a letter, <= 31 chars)")
    return name


def _int(value: object, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{key}: expected a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise TopologyError(f"{key}: {value} is out of range [{lo}, {hi}]")
    return value


def _host_list(value: object, key: str, known: set[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TopologyError(f"{key}: expected a non-empty list of host names")
    seen: list[str] = []
    for i, h in enumerate(value):
        name = _str(h, f"{key}[{i}]")
        if name not in known:
            raise TopologyError(f"{key}[{i}]: no host named {name!r}")
        if name in seen:
            raise TopologyError(f"{key}[{i}]: host {name!r} listed twice")
        seen.append(name)
    return tuple(seen)


def _array_of_tables(doc: dict, key: str) -> list[dict]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise TopologyError(f"{key}: expected an array of tables ([[{key}]])")
    return value


def _parse_host(t: dict, where: str) -> Host:
    _check_keys(t, {"name", "role", "cpus", "memory", "pool", "machine"}, where)
    name = _name(_require(t, "name", where), f"{where}.name")
    role = _str(_require(t, "role", where), f"{where}.role", ROLES)
    cpus = _int(t.get("cpus", 1), f"{where}.cpus", 1, 64)
    memory = parse_size(t.get("memory", "2G"), f"{where}.memory")
    if not 512 * MiB <= memory <= 256 * GiB:
        raise TopologyError(f"{where}.memory: {memory // MiB} MiB is impossible (allowed 512M to 256G)")
    if memory % MiB:
        raise TopologyError(f"{where}.memory: must be a whole number of MiB")
    pool = 0
    if role == "memory":
        pool = parse_size(t.get("pool", "512M"), f"{where}.pool")
        if pool % MiB or pool > memory - 384 * MiB:
            raise TopologyError(f"{where}.pool: {pool // MiB} MiB does not fit in memory {memory // MiB} MiB "
                                "(leave at least 384 MiB for the guest)")
    elif "pool" in t:
        raise TopologyError(f"{where}.pool: only hosts with role 'memory' lend a pool")
    machine = _name(t["machine"], f"{where}.machine") if "machine" in t else None
    return Host(name=name, role=role, cpus=cpus, memory=memory, pool=pool, machine=machine)


def _ssh_target(uri: str, key: str) -> SshTarget | None:
    """The machine a URI names (None: this one). Only ssh reaches another machine: the testbed
    copies files and runs switches there over the same connection libvirt uses."""
    parts = urlsplit(uri)
    if not parts.hostname:
        return None
    transport = parts.scheme.partition("+")[2]
    if transport not in ("ssh", "libssh", "libssh2"):
        raise TopologyError(f"{key}: {uri!r} names machine {parts.hostname!r} over "
                            f"{transport or 'tcp'!r}; another machine is reached over ssh "
                            "(qemu+ssh://USER@HOST/system), which the testbed also uses to copy files there")
    try:
        port = parts.port
    except ValueError:
        raise TopologyError(f"{key}: {uri!r} has an invalid port") from None
    return SshTarget(host=parts.hostname, user=parts.username, port=port)


def _libvirt_uri(value: object, key: str) -> str:
    uri = _str(value, key)
    if not LIBVIRT_URI_RE.match(uri):
        raise TopologyError(f"{key}: {uri!r} is not a libvirt QEMU URI such as {DEFAULT_LIBVIRT_URI!r} "
                            "(qemu[+transport]://[host]/system or /session)")
    return uri


def _parse_machines(doc: dict, backend: str) -> list[Machine]:
    """[[machine]] tables (libvirt only), or the one machine at the topology's `uri`."""
    tables = _array_of_tables(doc, "machine")
    if backend != "libvirt":
        if tables:
            raise TopologyError(f"machine: only backend = \"libvirt\" places hosts on machines (this topology's backend is {backend!r})")
        if "uri" in doc:
            raise TopologyError(f"uri: only backend = \"libvirt\" connects to libvirt (this topology's backend is {backend!r})")
        return []
    if not tables:
        uri = _libvirt_uri(doc.get("uri", DEFAULT_LIBVIRT_URI), "uri")
        return [Machine(name="local", uri=uri, ssh=_ssh_target(uri, "uri"))]
    if "uri" in doc:
        raise TopologyError("uri: a topology with [[machine]] tables gives each machine its own uri")
    machines: list[Machine] = []
    for i, t in enumerate(tables):
        where = f"machine[{i}]"
        _check_keys(t, {"name", "uri", "dir"}, where)
        uri = _libvirt_uri(_require(t, "uri", where), f"{where}.uri")
        ssh = _ssh_target(uri, f"{where}.uri")
        directory = _str(t.get("dir", DEFAULT_REMOTE_DIR), f"{where}.dir")
        if "dir" in t and ssh is None:
            raise TopologyError(f"{where}.dir: machine {t.get('name')!r} is this machine ({uri!r} names no host); "
                                "its files stay in the checkout's run directory")
        if not directory.startswith("/") or ".." in directory.split("/") or directory.rstrip("/") == "":
            raise TopologyError(f"{where}.dir: {directory!r} is not an absolute directory below /")
        m = Machine(name=_name(_require(t, "name", where), f"{where}.name"), uri=uri, ssh=ssh,
                    dir=directory.rstrip("/"))
        if any(o.name == m.name for o in machines):
            raise TopologyError(f"{where}.name: machine name {m.name!r} is used twice")
        if any(o.uri == m.uri for o in machines):
            raise TopologyError(f"{where}.uri: {m.uri!r} is already machine {next(o.name for o in machines if o.uri == m.uri)!r}")
        machines.append(m)
    return machines


def _place_hosts(hosts: list[Host], machines: list[Machine]) -> list[Host]:
    """Every host of a libvirt topology on a known machine (the first one unless it says)."""
    if not machines:
        for i, h in enumerate(hosts):
            if h.machine is not None:
                raise TopologyError(f"host[{i}].machine: only backend = \"libvirt\" places hosts on machines")
        return hosts
    names = [m.name for m in machines]
    placed = []
    for i, h in enumerate(hosts):
        if h.machine is not None and h.machine not in names:
            raise TopologyError(f"host[{i}].machine: no machine named {h.machine!r} (machines: {', '.join(names)})")
        placed.append(Host(name=h.name, role=h.role, cpus=h.cpus, memory=h.memory, pool=h.pool,
                           machine=h.machine or names[0]))
    for i, m in enumerate(machines):
        if not any(h.machine == m.name for h in placed):
            raise TopologyError(f"machine[{i}]: no host is placed on machine {m.name!r}")
    return placed


def _parse_cxl(t: dict, where: str, known: set[str], backend: str) -> CxlDevice:
    _check_keys(t, {"name", "emulation", "size", "hosts", "backing"}, where)
    name = _name(_require(t, "name", where), f"{where}.name")
    emulation = _str(t.get("emulation", EMULATIONS[backend][0]), f"{where}.emulation", EMULATIONS[backend])
    size = parse_size(_require(t, "size", where), f"{where}.size")
    # CXL host-managed memory is interleaved in 256 MiB granules; nvdimm namespaces need 2 MiB
    # alignment. One rule for both keeps topologies portable between emulations.
    if size % (256 * MiB) or not 256 * MiB <= size <= 64 * GiB:
        raise TopologyError(f"{where}.size: {size} bytes is impossible (a multiple of 256M from 256M to 64G)")
    hosts = _host_list(_require(t, "hosts", where), f"{where}.hosts", known)
    if len(hosts) > max_cxl_hosts():
        raise TopologyError(f"{where}.hosts: {len(hosts)} hosts; the agent's shared directory has slots for {max_cxl_hosts()}")
    backing = t.get("backing")
    if backing is not None:
        backing = _str(backing, f"{where}.backing")
        if not backing.startswith("/"):
            raise TopologyError(f"{where}.backing: must be an absolute path")
    return CxlDevice(name=name, emulation=emulation, size=size, hosts=hosts, backing=backing)


def _parse_link(t: dict, where: str, known: set[str], backend: str) -> Link:
    _check_keys(t, {"name", "subnet", "hosts", "rdma"}, where)
    name = _name(_require(t, "name", where), f"{where}.name")
    subnet_text = _str(_require(t, "subnet", where), f"{where}.subnet")
    try:
        subnet = ipaddress.IPv4Network(subnet_text, strict=True)
    except ValueError as e:
        raise TopologyError(f"{where}.subnet: {subnet_text!r} is not an IPv4 network ({e})") from None
    if not 8 <= subnet.prefixlen <= 29:
        raise TopologyError(f"{where}.subnet: prefix /{subnet.prefixlen} is out of range (/8 to /29)")
    if backend in GUEST_BACKENDS and subnet.overlaps(ipaddress.IPv4Network("10.0.2.0/24")):
        raise TopologyError(f"{where}.subnet: {subnet} overlaps 10.0.2.0/24, which the management NIC uses")
    hosts = _host_list(_require(t, "hosts", where), f"{where}.hosts", known)
    if len(hosts) > subnet.num_addresses - 2:
        raise TopologyError(f"{where}.subnet: {subnet} has room for {subnet.num_addresses - 2} hosts, not {len(hosts)}")
    rdma = t.get("rdma", True)
    if not isinstance(rdma, bool):
        raise TopologyError(f"{where}.rdma: expected true or false, got {rdma!r}")
    return Link(name=name, subnet=subnet, hosts=hosts, rdma=rdma)


def _parse_attachments(doc: dict, key: str, parse, known: set[str], backend: str, noun: str, taken: str) -> list:
    """[[cxl]] and [[link]] tables: unique names, and each host in at most one of them."""
    items: list = []
    for i, t in enumerate(_array_of_tables(doc, key)):
        item = parse(t, f"{key}[{i}]", known, backend)
        if any(o.name == item.name for o in items):
            raise TopologyError(f"{key}[{i}].name: {noun} name {item.name!r} is used twice")
        for h in item.hosts:
            other = next((o.name for o in items if h in o.hosts), None)
            if other:
                raise TopologyError(f"{key}[{i}].hosts: host {h!r} " + taken.format(other=other))
        items.append(item)
    return items


def parse_topology(doc: dict, default_name: str = "testbed", source: Path | None = None) -> Topology:
    _check_keys(doc, {"name", "backend", "accel", "uri", "machine", "host", "cxl", "link"}, "topology")
    name = _name(doc.get("name", default_name), "name")
    backend = _str(doc.get("backend", "qemu"), "backend", BACKENDS)
    accel = _str(doc.get("accel", "auto"), "accel", ACCELS)
    if backend == "native" and "accel" in doc:
        raise TopologyError("accel: native hosts run on this machine's CPU; 'accel' is for QEMU guests (backend qemu or libvirt) only")
    machines = _parse_machines(doc, backend)

    hosts: list[Host] = []
    for i, t in enumerate(_array_of_tables(doc, "host")):
        h = _parse_host(t, f"host[{i}]")
        if any(o.name == h.name for o in hosts):
            raise TopologyError(f"host[{i}].name: host name {h.name!r} is used twice")
        hosts.append(h)
    if not hosts:
        raise TopologyError("topology: at least one [[host]] is required")
    hosts = _place_hosts(hosts, machines)
    known = {h.name for h in hosts}

    devices = _parse_attachments(doc, "cxl", _parse_cxl, known, backend, "device",
                                 "already attaches {other!r} (one CXL device per host)")
    links = _parse_attachments(doc, "link", _parse_link, known, backend, "link",
                               "is already on link {other!r} (one data link per host)")

    for i, dev in enumerate(devices):
        on = {hosts[[h.name for h in hosts].index(name)].machine for name in dev.hosts}
        if len(on) > 1:
            where = ", ".join(f"{name} on {next(h.machine for h in hosts if h.name == name)}" for name in dev.hosts)
            raise TopologyError(f"cxl[{i}].hosts: {where}: the hosts of a CXL device share one machine "
                                "(its backing file, the multi-headed device, lives there)")
    for h in hosts:
        if h.role == "memory":
            link = next((l for l in links if h.name in l.hosts), None)
            if link is None or not link.rdma:
                raise TopologyError(f"host {h.name!r}: a memory node needs a link with rdma = true to lend its pool")
    return Topology(name=name, accel=accel, hosts=tuple(hosts), cxl=tuple(devices), links=tuple(links),
                    backend=backend, machines=tuple(machines), source=source)


def load_topology(path: str | Path) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise TopologyError(f"{p}: no such topology file") from None
    except OSError as e:
        raise TopologyError(f"{p}: cannot read ({e.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"{p}: not valid TOML ({e})") from None
    try:
        return parse_topology(doc, default_name=p.stem, source=p.resolve())
    except TopologyError as e:
        raise TopologyError(f"{p}: {e}") from None
