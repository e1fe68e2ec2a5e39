"""The libvirt backend without libvirt: the domain XML of the default and nvdimm topologies, the
topology rules for backend = "libvirt", and `tb up`/`down` against a fake virsh on PATH (what
is refused before anything is defined, what `down` removes and what it leaves alone)."""
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from conftest import REPO
from snaptier_qemu.argv import qemu_argv
from snaptier_qemu.domain_xml import QEMU_NS, SNAPTIER_NS, commandline_args, domain_xml, parse_metadata
from snaptier_testbed.machine import Runtime, describe
from snaptier_testbed.topology import TopologyError, load_topology, parse_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]
RT = Runtime(repo=Path("/repo"), state_dir=Path("/state"), image_dir=Path("/img"), accel="tcg",
             ssh_ports={"host0": 2201, "host1": 2202, "mem0": 2203}, boot_id="b00t")


def specs(topology="default", accel="tcg"):
    t = load_topology(REPO / f"testbed/topologies/{topology}.toml")
    return {s.name: s for s in describe(t, Runtime(**{**RT.__dict__, "accel": accel}))}


def xml_of(spec, topology="default"):
    return domain_xml(spec, Path(f"/state/{spec.name}.root.qcow2"), topology, Path("/state"),
                      emulator="/usr/bin/qemu-system-x86_64")


def parsed(spec, topology="default"):
    return ET.fromstring(xml_of(spec, topology))


def qemu_args(root):
    return [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def pairs(argv, flags=("-object", "-device", "-netdev", "-M")):
    return [(a, argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in flags]


def is_cxl(pair):
    flag, value = pair
    # The machine flags (q35,cxl=on in one backend, cxl=on in the other) are compared apart.
    return any(w in value for w in ("cxl", "nvdimm", "id=nv0")) and not value.startswith(("q35", "cxl=on", "nvdimm=on"))


def test_domain_has_the_machine_of_the_spec():
    s = specs()["host0"]
    d = parsed(s)
    assert d.get("type") == "qemu"
    assert d.findtext("name") == "snaptier-default-host0" == s.tag
    assert d.find("memory").text == "2048" and d.find("memory").get("unit") == "MiB"
    assert d.findtext("vcpu") == "1"
    os_ = d.find("os")
    assert os_.find("type").get("machine") == "q35" and os_.find("type").get("arch") == "x86_64"
    assert os_.findtext("kernel") == "/img/vmlinuz" and os_.findtext("initrd") == "/img/initrd.img"
    assert os_.findtext("cmdline") == " ".join(s.cmdline)
    assert opt(qemu_argv(s), "-append") == os_.findtext("cmdline")   # the same kernel command line
    assert d.find("features/acpi") is not None   # libvirt passes acpi=off without it; CXL needs ACPI
    assert d.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"
    assert [d.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    # The type-3 device needs a CPU that reports no hypervisor, as in the direct backend.
    assert [(f.get("policy"), f.get("name")) for f in d.findall("cpu/feature")] == [("disable", "hypervisor")]
    assert d.find("cpu").get("mode") == "maximum"


def opt(argv, flag):
    return argv[argv.index(flag) + 1]


def test_accelerator_is_the_domain_type():
    assert parsed(specs(accel="tcg")["host0"]).get("type") == "qemu"
    assert parsed(specs(accel="kvm")["host0"]).get("type") == "kvm"
    assert parsed(specs(accel="kvm-then-tcg")["host0"]).get("type") == "kvm"


def test_root_disk_is_an_overlay_over_the_cached_image():
    disk = parsed(specs()["host0"]).find("devices/disk")
    assert disk.find("source").get("file") == "/state/host0.root.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("backingStore/source").get("file") == "/img/root.img"
    assert disk.find("backingStore/format").get("type") == "raw"
    assert disk.find("target").get("dev") == "vda"   # the kernel's root=/dev/vda


def test_shares_serial_console_and_marker():
    d = parsed(specs()["host1"])
    shares = {fs.find("target").get("dir"): fs for fs in d.findall("devices/filesystem")}
    assert set(shares) == {"snaptier", "shared"}
    assert shares["snaptier"].find("source").get("dir") == "/repo" and shares["snaptier"].find("readonly") is not None
    assert shares["shared"].find("source").get("dir") == "/state/share" and shares["shared"].find("readonly") is None
    assert all(fs.get("type") == "mount" and fs.get("accessmode") == "squash" for fs in shares.values())
    serial = d.find("devices/serial")
    assert serial.get("type") == "unix"
    assert serial.find("source").get("path") == "/state/host1.console" and serial.find("source").get("mode") == "bind"
    assert serial.find("log").get("file") == "/state/host1.serial.log"
    assert parse_metadata(xml_of(specs()["host1"])) == {"topology": "default", "host": "host1", "role": "compute",
                                                        "state": "/state"}
    assert parse_metadata("<domain><name>x</name></domain>") is None


def test_every_device_libvirt_places_is_on_the_root_bus():
    d = parsed(specs()["host0"])
    addresses = d.findall("devices/*/address")
    assert len(addresses) == 3   # root disk, two shares
    assert all(a.get("bus") == "0x00" and int(a.get("slot"), 16) >= 0x10 for a in addresses)


@pytest.mark.parametrize("topology,host", [("default", "host0"), ("default", "host1"), ("nvdimm", "host0"),
                                           ("nvdimm", "host1")])
def test_cxl_commandline_equals_the_direct_backends_arguments(topology, host):
    s = specs(topology)[host]
    argv, passed = qemu_argv(s), qemu_args(parsed(s, topology))
    cxl = [p for p in pairs(argv) if is_cxl(p)]
    assert cxl and [p for p in pairs(passed) if is_cxl(p)] == cxl
    # The machine flags the direct backend adds to q35: cxl=on or nvdimm=on.
    flags = opt(argv, "-M").split(",")[1:]
    assert flags and ("-M", ",".join(flags)) in pairs(passed)
    # The NICs are passed as the direct backend passes them: restrict=on, VDE, MACs.
    nics = [p for p in pairs(argv) if p[0] == "-netdev" or p[1].startswith("virtio-net-pci")]
    assert [p for p in pairs(passed) if p[0] == "-netdev" or p[1].startswith("virtio-net-pci")] == nics
    assert ("-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{RT.ssh_ports[host]}-:22") in nics
    assert passed[:2] == ["-name", f"process={s.tag}"]
    assert commandline_args(s) == passed


def test_memory_node_has_no_cxl_and_no_machine_flags():
    s = specs()["mem0"]
    passed = qemu_args(parsed(s))
    assert not [p for p in pairs(passed) if is_cxl(p)] and "-M" not in passed
    assert parsed(s).find("cpu/feature") is None


def test_nvdimm_gets_hotplug_slots_and_one_numa_node():
    s = specs("nvdimm")["host0"]
    d = parsed(s, "nvdimm")
    maxmem = opt(qemu_argv(s), "-m").split("maxmem=")[1]
    assert d.find("maxMemory").get("slots") == "2" and d.find("maxMemory").text + "M" == maxmem
    cell = d.find("cpu/numa/cell")
    assert cell.get("memory") == "2048" and cell.get("cpus") == "0-0"
    assert d.find("cpu/feature") is None   # an NVDIMM does not need hypervisor=off
    assert parsed(specs("nvdimm")["mem0"], "nvdimm").find("maxMemory") is None


@pytest.mark.skipif(not shutil.which("virt-xml-validate") or not shutil.which("xmllint"),
                    reason="virt-xml-validate is not installed (libvirt-clients and libxml2-utils; make deps)")
@pytest.mark.parametrize("topology", ["default", "nvdimm", "libvirt"])
def test_domains_validate_against_libvirts_schema(topology, tmp_path):
    for s in specs(topology).values():
        f = tmp_path / f"{s.tag}.xml"
        f.write_text(xml_of(s, topology))
        r = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_domain_xml_imports_nothing_of_the_testbed_at_run_time():
    code = ("import sys; sys.path.insert(0, %r); import snaptier_qemu.domain_xml; "
            "print(sorted(m for m in sys.modules if m.startswith('snaptier_testbed')))" % str(REPO / "qemu"))
    r = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


# ---------------------------------------------------------------- topology rules
def lv(**extra):
    d = {"name": "lvt", "backend": "libvirt",
         "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"}],
         "cxl": [{"name": "c0", "size": "256M", "hosts": ["a", "b"]}],
         "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b"], "rdma": False}]}
    d.update(extra)
    return d


def test_libvirt_topology_defaults():
    t = parse_topology(lv())
    assert t.backend == "libvirt" and t.uri == "qemu:///system" and t.cxl[0].emulation == "type3" and t.guests
    assert parse_topology(lv(uri="qemu:///session", accel="tcg")).uri == "qemu:///session"
    assert parse_topology({"host": [{"name": "a", "role": "compute"}]}).uri is None


def test_the_libvirt_topology_is_the_default_one_under_another_name():
    default, lvt = (load_topology(REPO / f"testbed/topologies/{n}.toml") for n in ("default", "libvirt"))
    assert lvt.backend == "libvirt" and default.backend == "qemu" and lvt.name != default.name
    assert [dataclasses.replace(h, machine=None) for h in lvt.hosts] == list(default.hosts) and lvt.cxl == default.cxl
    assert {h.machine for h in lvt.hosts} == {"local"} and lvt.machines[0].uri == lvt.uri
    assert [(l.name, l.hosts, l.rdma) for l in lvt.links] == [(l.name, l.hosts, l.rdma) for l in default.links]


TWO = [{"name": "one", "uri": "qemu:///system"}, {"name": "two", "uri": "qemu+ssh://root@127.0.0.1/system"}]


def test_hosts_are_placed_on_machines_the_first_by_default():
    d = lv(machine=TWO)
    d["host"] = d["host"] + [{"name": "m", "role": "memory", "machine": "two"}]
    d["link"] = [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b", "m"]}]
    t = parse_topology(d)
    assert [m.name for m in t.machines] == ["one", "two"]
    assert {h.name: h.machine for h in t.hosts} == {"a": "one", "b": "one", "m": "two"}
    assert t.machine_of("m").uri == "qemu+ssh://root@127.0.0.1/system"


def with_host(d, **host):
    d["host"] = [{**d["host"][0], **host}] + d["host"][1:]
    return d


@pytest.mark.parametrize("d,message", [
    (with_host(lv(machine=TWO), machine="two"),
     r"cxl\[0\]\.hosts: a on two, b on one: the hosts of a CXL device share one machine"),
    (with_host(lv(machine=TWO, cxl=[]), machine="three"), r"host\[0\]\.machine: no machine named 'three' \(machines: one, two\)"),
    (lv(machine=TWO), r"machine\[1\]: no host is placed on machine 'two'"),
    (lv(machine=TWO, uri="qemu:///system"), r"uri: a topology with \[\[machine\]\] tables gives each machine its own uri"),
    (lv(machine=[TWO[0], {**TWO[1], "name": "one"}]), r"machine\[1\]\.name: machine name 'one' is used twice"),
    (lv(machine=[TWO[0], {**TWO[1], "uri": "qemu:///system"}]), r"machine\[1\]\.uri: 'qemu:///system' is already machine 'one'"),
    (lv(machine=[{"name": "one", "uri": "xen:///"}]), r"machine\[0\]\.uri: 'xen:///' is not a libvirt QEMU URI"),
    (lv(machine=[{"name": "one"}]), r"machine\[0\]: missing required key 'uri'"),
    ({**lv(machine=TWO), "backend": "qemu"}, r"machine: only backend = \"libvirt\" places hosts on machines"),
    (with_host({**lv(), "backend": "qemu"}, machine="one"), r"host\[0\]\.machine: only backend = \"libvirt\""),
])
def test_machine_refusals_name_the_key(d, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(d)


@pytest.mark.parametrize("d,message", [
    (lv(uri="xen:///system"), r"uri: 'xen:///system' is not a libvirt QEMU URI"),
    (lv(uri="qemu:///nowhere"), r"uri: 'qemu:///nowhere' is not a libvirt QEMU URI"),
    (lv(uri=5), r"uri: expected a string"),
    ({**lv(), "backend": "qemu", "uri": "qemu:///system"}, r"uri: only backend = \"libvirt\" connects to libvirt"),
    (lv(cxl=[{"name": "c0", "size": "256M", "hosts": ["a"], "emulation": "shm"}]),
     r"cxl\[0\]\.emulation: 'shm' is not one of type3, nvdimm"),
    (lv(link=[{"name": "l0", "subnet": "10.0.2.0/24", "hosts": ["a"], "rdma": False}]), r"overlaps 10\.0\.2\.0/24"),
])
def test_libvirt_topology_refusals_name_the_key(d, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(d)


# ---------------------------------------------------------------- tb up / down with a fake virsh
FAKE_VIRSH = r"""#!/bin/bash
# A stand-in for virsh: the domains are files in $FAKE_VIRSH (NAME.xml, NAME.state).
echo "$*" >> "$FAKE_VIRSH/calls"
shift 3   # -q -c URI
cmd=$1; shift
case $cmd in
  version) [ -f "$FAKE_VIRSH/unreachable" ] && { echo "error: failed to connect to the hypervisor" >&2; exit 1; }
           echo "Running hypervisor: QEMU 10.0.2" ;;
  list) for f in "$FAKE_VIRSH"/*.xml; do [ -f "$f" ] && basename "$f" .xml; done; true ;;
  dumpxml) [ "$1" = --inactive ] && shift; cat "$FAKE_VIRSH/$1.xml" ;;
  domstate) cat "$FAKE_VIRSH/$1.state" 2>/dev/null || echo "shut off" ;;
  destroy) echo "shut off" > "$FAKE_VIRSH/$1.state" ;;
  undefine) rm -f "$FAKE_VIRSH/$1.xml" "$FAKE_VIRSH/$1.state" ;;
  define|start) echo "error: the fake virsh defines nothing" >&2; exit 1 ;;
  *) echo "error: unknown command $cmd" >&2; exit 1 ;;
esac
"""

TOPOLOGY = """name = "lvfake"
backend = "libvirt"
accel = "tcg"
[[host]]
name = "a"
role = "compute"
memory = "512M"
[[host]]
name = "b"
role = "compute"
memory = "512M"
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir, domains, state = tmp_path / "bin", tmp_path / "domains", tmp_path / "state"
    for d in (bin_dir, domains, state):
        d.mkdir()
    (bin_dir / "virsh").write_text(FAKE_VIRSH)
    (bin_dir / "virsh").chmod(0o755)
    topo = tmp_path / "lvfake.toml"
    topo.write_text(TOPOLOGY)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_VIRSH": str(domains),
           "SNAPTIER_STATE": str(state)}

    class Fake:
        state_dir = state / "lvfake"

        def tb(self, *args):
            return subprocess.run([*TB, "-t", str(topo), *args], capture_output=True, text=True, env=env, timeout=120)

        def domain(self, name, marker=None, state="shut off"):
            meta = (f'<metadata><snaptier:host xmlns:snaptier="{SNAPTIER_NS}" topology="{marker[0]}" host="x" '
                    f'role="compute" state="{marker[1]}"/></metadata>' if marker else "")
            (domains / f"{name}.xml").write_text(f"<domain type='qemu'><name>{name}</name>{meta}</domain>\n")
            (domains / f"{name}.state").write_text(state + "\n")

        def domains(self):
            return sorted(p.stem for p in domains.glob("*.xml"))

        def calls(self):
            f = domains / "calls"
            return [l.split()[3] for l in f.read_text().splitlines()] if f.exists() else []
    return Fake()


def test_up_refuses_a_libvirt_that_does_not_answer(fake):
    (fake.state_dir.parent.parent / "domains" / "unreachable").touch()
    r = fake.tb("up")
    assert r.returncode == 2
    assert "libvirt at qemu:///system does not answer" in r.stderr and "testbed/libvirt/daemon.sh start" in r.stderr
    assert "define" not in fake.calls() and "start" not in fake.calls()
    r = fake.tb("validate")
    assert r.returncode == 2 and "cannot run on this machine: libvirt at qemu:///system does not answer" in r.stderr


def test_up_refuses_a_domain_of_our_name_that_is_not_ours(fake):
    fake.domain("snaptier-lvfake-b")                                    # no marker: someone else's
    r = fake.tb("up")
    assert r.returncode == 2, r.stderr
    assert "libvirt domain snaptier-lvfake-b already exists" in r.stderr and "no snaptier marker" in r.stderr
    assert "define" not in fake.calls()
    fake.domain("snaptier-lvfake-b", marker=("lvfake", "/elsewhere/run/lvfake"))   # the same name, another checkout
    r = fake.tb("up")
    assert r.returncode == 2 and "topology 'lvfake' of /elsewhere/run/lvfake" in r.stderr
    assert fake.domains() == ["snaptier-lvfake-b"]   # left alone


def test_up_refuses_a_running_domain_of_this_topology(fake):
    fake.domain("snaptier-lvfake-a", marker=("lvfake", str(fake.state_dir)), state="running")
    r = fake.tb("up")
    assert r.returncode == 2 and "topology 'lvfake' is already up: domain snaptier-lvfake-a is running" in r.stderr
    assert "define" not in fake.calls() and "destroy" not in fake.calls()


def test_down_removes_only_this_topologys_domains_and_is_idempotent(fake):
    fake.domain("snaptier-lvfake-a", marker=("lvfake", str(fake.state_dir)), state="running")
    fake.domain("snaptier-lvfake-b", marker=("lvfake", "/elsewhere/run/lvfake"), state="running")
    # A host the topology file no longer lists, still marked as this topology's: removed too.
    fake.domain("snaptier-lvfake-c", marker=("lvfake", str(fake.state_dir)))
    fake.domain("snaptier-other-a", marker=("other", str(fake.state_dir)), state="running")
    fake.domain("snaptier-lvfake-x-a", marker=("lvfake-x", str(fake.state_dir)), state="running")  # a longer name
    fake.domain("snaptier-lvfake-d")                                                           # no marker
    r = fake.tb("down")
    assert r.returncode == 0, r.stderr
    assert "2 domains removed" in r.stderr
    assert fake.domains() == ["snaptier-lvfake-b", "snaptier-lvfake-d", "snaptier-lvfake-x-a", "snaptier-other-a"]
    assert fake.calls().count("destroy") == 1   # only the running one of ours
    r = fake.tb("down")
    assert r.returncode == 0 and "0 domains removed" in r.stderr


def test_down_without_libvirt_still_succeeds(fake):
    (fake.state_dir.parent.parent / "domains" / "unreachable").touch()
    r = fake.tb("down")
    assert r.returncode == 0 and "does not answer: no domain can be undefined" in r.stderr


def test_a_shut_off_domain_of_this_topology_is_left_for_up_to_replace(fake, monkeypatch):
    from snaptier_testbed import libvirt_backend
    from snaptier_testbed.topology import load_topology as load
    monkeypatch.setenv("PATH", f"{fake.state_dir.parent.parent / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VIRSH", str(fake.state_dir.parent.parent / "domains"))
    fake.domain("snaptier-lvfake-a", marker=("lvfake", str(fake.state_dir)))
    topo = load(fake.state_dir.parent.parent / "lvfake.toml")
    assert libvirt_backend.refuse_clashes(topo, fake.state_dir) == ["snaptier-lvfake-a"]
    assert "undefine" not in fake.calls()   # replaced only once the image is ready
