"""MachineSpec -> libvirt domain XML. Pure: no I/O, unit-tested; the second translator of the
same spec as argv.py.

What libvirt expresses itself: memory (and the NVDIMM's hotplug slots), vCPUs, the CPU model,
direct kernel boot, the root disk, the 9p shares, the serial console on the same Unix socket
and log file as the direct backend, the emulator, the accelerator (domain type kvm | qemu).
What goes through <qemu:commandline>, built by argv.py's own helpers so both backends pass the
same words:
- the CXL bus, root port and type-3 device with its backing object and fixed memory window, or
  the NVDIMM and its backing object: libvirt has no CXL element, and its <memory model='nvdimm'>
  would rename the objects and need its own NUMA layout, so the two emulations stay alike;
- the machine flags (cxl=on / nvdimm=on): libvirt has no attribute for either;
- both NICs: libvirt has no VDE interface, and its user-mode interface (slirp) has neither
  restrict=on nor host forwards;
- ``-name process=TAG``: QEMU merges it with libvirt's own -name, so the process carries the
  same tag as under the direct backend, which `running_hosts` and `down` look for.

The direct backend's QMP socket is not recreated: libvirt owns the monitor, and only the direct
backend's `down` spoke QMP (here `virsh destroy` does that job).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from .argv import MiB, QEMU, cpu_model, cxl_args, machine_flags, nic_args, nvdimm_maxmem

if TYPE_CHECKING:
    from snaptier_testbed.machine import MachineSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Marks a domain as made by the testbed, for which topology and state directory: `up` refuses
# a domain of the same name without it, `down` removes only domains carrying it.
SNAPTIER_NS = "urn:snaptier:testbed:1"
EMULATOR = "/usr/bin/" + QEMU
ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("snaptier", SNAPTIER_NS)

# PCI slots on pcie.0 for the devices libvirt places. Explicit addresses keep every device on
# the root bus as in the direct backend (no pcie-root-ports, whose bus numbers would have to
# stay below the CXL bridge's bus_nr=12). They start high because QEMU creates the
# <qemu:commandline> devices (NICs, CXL bridge: no address, as in argv.py) before libvirt's
# JSON-syntax ones, so those take the first free slots from 1 up.
SLOT_ROOT_DISK = 0x10
SLOT_FIRST_SHARE = 0x11


def domain_name(spec: MachineSpec) -> str:
    """snaptier-<topology>-<host>: the process tag of the direct backend."""
    return spec.tag


def domain_type(accel: str) -> str:
    """libvirt cannot fall back from KVM to TCG at start; 'kvm-then-tcg' (resolve_accel found
    that KVM boots a guest here) becomes kvm."""
    return "qemu" if accel == "tcg" else "kvm"


def commandline_args(spec: MachineSpec) -> list[str]:
    """The QEMU arguments the domain passes through <qemu:commandline>, in order."""
    args = ["-name", f"process={spec.tag}"]
    flags = machine_flags(spec)
    if flags:
        args += ["-M", ",".join(flags)]
    for nic in spec.nics:
        args += nic_args(nic)
    return args + cxl_args(spec)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        e.text = text
    return e


def _pci(parent: ET.Element, slot: int) -> None:
    _sub(parent, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{slot:02x}", function="0x0")


def domain_xml(spec: MachineSpec, root_disk: Path, topology: str, state_dir: Path,
               emulator: str = EMULATOR, machine: str | None = None) -> str:
    """The domain of one host. `root_disk` is a qcow2 overlay over spec.root_image that the
    launcher creates per boot (libvirt has no snapshot=on), so every guest boots the one cached
    image and its writes vanish at `down`."""
    dom = ET.Element("domain", {"type": domain_type(spec.accel)})
    _sub(dom, "name", domain_name(spec))
    _sub(dom, "title", f"snaptier {topology}/{spec.name}")
    meta = _sub(dom, "metadata")
    marker = {"topology": topology, "host": spec.name, "role": spec.role, "state": str(state_dir)}
    if machine:
        marker["machine"] = machine    # the topology's machine: two URIs may reach one libvirt
    ET.SubElement(meta, f"{{{SNAPTIER_NS}}}host", marker)
    nvdimm = spec.cxl is not None and spec.cxl.emulation == "nvdimm"
    if nvdimm:
        # The NVDIMM (from <qemu:commandline>) needs hotplug slots and room above guest RAM.
        _sub(dom, "maxMemory", str(nvdimm_maxmem(spec) // MiB), slots="2", unit="MiB")
    _sub(dom, "memory", str(spec.memory // MiB), unit="MiB")
    _sub(dom, "vcpu", str(spec.cpus), placement="static")

    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_, "kernel", str(spec.kernel))
    _sub(os_, "initrd", str(spec.initrd))
    _sub(os_, "cmdline", " ".join(spec.cmdline))
    features = _sub(dom, "features")
    _sub(features, "acpi")   # without it libvirt passes acpi=off, and CXL's CEDT/CFMWS live in ACPI
    _sub(features, "apic")

    model = cpu_model(spec).split(",")
    if model[0] != "max":
        raise ValueError(f"cpu model {model[0]!r}: only 'max' is mapped to libvirt")
    cpu = _sub(dom, "cpu", mode="maximum", check="none", migratable="off")
    for feature in model[1:]:
        name, _, value = feature.partition("=")
        _sub(cpu, "feature", policy="disable" if value == "off" else "require", name=name)
    if nvdimm:
        # libvirt allows memory hotplug slots only with a NUMA layout: one node, all of it.
        numa = _sub(cpu, "numa")
        _sub(numa, "cell", id="0", cpus=f"0-{spec.cpus - 1}", memory=str(spec.memory // MiB), unit="MiB")

    _sub(dom, "clock", offset="utc")
    # -no-reboot: the guest's panic=-1 reboot, a poweroff or a crash ends the domain.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")

    dev = _sub(dom, "devices")
    _sub(dev, "emulator", emulator)
    disk = _sub(dev, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=str(root_disk))
    backing = _sub(disk, "backingStore", type="file")
    _sub(backing, "format", type="raw")
    _sub(backing, "source", file=str(spec.root_image))
    _sub(backing, "backingStore")
    _sub(disk, "target", dev="vda", bus="virtio")
    _pci(disk, SLOT_ROOT_DISK)
    for i, share in enumerate(spec.shares):
        # accessmode='squash' is QEMU's security_model=none, the direct backend's: files are
        # created as QEMU's user (root) and failed chowns are ignored.
        fs = _sub(dev, "filesystem", type="mount", accessmode="squash")
        _sub(fs, "driver", type="path")
        _sub(fs, "source", dir=str(share.path))
        _sub(fs, "target", dir=share.tag)
        if share.readonly:
            _sub(fs, "readonly")
        _pci(fs, SLOT_FIRST_SHARE + i)
    _sub(dev, "controller", type="usb", model="none")
    serial = _sub(dev, "serial", type="unix")
    _sub(serial, "source", mode="bind", path=str(spec.console_socket))
    _sub(serial, "log", file=str(spec.console_log), append="off")
    target = _sub(serial, "target", type="isa-serial", port="0")
    _sub(target, "model", name="isa-serial")
    _sub(dev, "memballoon", model="none")

    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in commandline_args(spec):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def parse_metadata(xml_text: str) -> dict[str, str] | None:
    """The snaptier marker of a domain's XML (topology, host, role, state[, machine]), or None."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    marker = root.find(f"metadata/{{{SNAPTIER_NS}}}host")
    return dict(marker.attrib) if marker is not None else None
