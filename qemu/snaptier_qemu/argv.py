"""MachineSpec -> qemu-system-x86_64 arguments. Pure: no I/O, unit-tested. The pieces libvirt has
no element for (CXL, the NICs) are helpers here that domain_xml.py passes through unchanged.

Facts this encodes (verified under QEMU 10.0 TCG, see docs/testbed.md):
- CXL type-3 needs ``-M q35,cxl=on``, a pxb-cxl host bridge, a root port, a fixed memory
  window (cxl-fmw) at least as large as the device, and ``-cpu ...,hypervisor=off``: the
  Debian kernel refuses to commit a region when the CPU reports a hypervisor.
- With a pxb-cxl bridge present every other PCI device must name ``bus=pcie.0``.
- NVDIMM needs ``nvdimm=on`` and memory hotplug slots (maxmem).
- ``-append`` is given exactly once: a second one silently wins.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the description is testbed's; the backend only reads it (no import at run time)
    from snaptier_testbed.machine import MachineSpec, Nic

QEMU = "qemu-system-x86_64"
GiB = 1 << 30
MiB = 1 << 20


def _fmw_size(device_size: int) -> int:
    """The fixed memory window must cover the device; 4 GiB granules keep the address map tidy."""
    return max(4 * GiB, -(-device_size // (4 * GiB)) * 4 * GiB)


def machine_flags(spec: MachineSpec) -> list[str]:
    """Machine properties the CXL attachment needs, beside the machine type."""
    if spec.cxl and spec.cxl.emulation == "type3":
        return ["cxl=on"]
    if spec.cxl and spec.cxl.emulation == "nvdimm":
        return ["nvdimm=on"]
    return []


def cpu_model(spec: MachineSpec) -> str:
    if spec.cxl and spec.cxl.emulation == "type3":
        return "max,hypervisor=off"
    return "max"


def nvdimm_maxmem(spec: MachineSpec) -> int:
    """Bytes of maxmem an NVDIMM needs: guest RAM, the device, and 1 GiB of slack for alignment."""
    assert spec.cxl and spec.cxl.emulation == "nvdimm"
    return spec.memory + spec.cxl.size + GiB


def nic_args(nic: Nic) -> list[str]:
    """-netdev and -device of one NIC; every NIC is on pcie.0 (see the module docstring)."""
    if nic.kind == "user":
        # restrict=on: the guest reaches nothing outside; only the forwarded ports reach it.
        fwd = "".join(f",hostfwd=tcp:{a}:{hp}-:{gp}" for a, hp, gp in nic.forwards)
        netdev = f"user,id={nic.id},restrict=on{fwd}"
    elif nic.kind == "switch":
        netdev = f"vde,id={nic.id},sock={nic.switch}"
    else:
        raise ValueError(f"unknown NIC kind {nic.kind!r}")
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={nic.id},mac={nic.mac},bus=pcie.0,romfile="]


def cxl_args(spec: MachineSpec) -> list[str]:
    """The shared device: its backing object, the CXL bus, root port, type-3 device and fixed
    memory window (type3), or the NVDIMM (nvdimm). The machine flags are machine_flags()'s."""
    if not spec.cxl:
        return []
    c = spec.cxl
    if c.emulation == "type3":
        return ["-object", f"memory-backend-file,id=cxl-mem0,share=on,mem-path={c.backing},size={c.size}",
                "-device", "pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1",
                "-device", "cxl-rp,port=0,bus=cxl.1,id=cxl-rp0,chassis=0,slot=2",
                "-device", "cxl-type3,bus=cxl-rp0,volatile-memdev=cxl-mem0,id=cxl-vmem0",
                "-M", f"cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size={_fmw_size(c.size) // GiB}G"]
    if c.emulation == "nvdimm":
        return ["-object", f"memory-backend-file,id=nv0,share=on,mem-path={c.backing},size={c.size}",
                "-device", "nvdimm,id=nvdimm0,memdev=nv0"]
    raise ValueError(f"unknown CXL emulation {c.emulation!r}")


def qemu_argv(spec: MachineSpec, qemu: str = QEMU, daemonize: bool = True) -> list[str]:
    argv = [qemu, "-name", f"{spec.name},process={spec.tag}"]
    if spec.accel == "tcg":
        argv += ["-accel", "tcg"]
    elif spec.accel == "kvm":
        argv += ["-accel", "kvm"]
    else:  # kvm-then-tcg: QEMU falls back to TCG when KVM cannot initialise
        argv += ["-accel", "kvm", "-accel", "tcg"]
    memory = f"{spec.memory // MiB}M"
    if spec.cxl and spec.cxl.emulation == "nvdimm":
        memory += f",slots=2,maxmem={nvdimm_maxmem(spec) // MiB}M"
    argv += ["-M", ",".join(["q35", *machine_flags(spec)]), "-cpu", cpu_model(spec), "-smp", str(spec.cpus),
             "-m", memory]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if daemonize:
        argv += ["-daemonize"]
    argv += ["-pidfile", str(spec.pidfile)]
    argv += ["-chardev", f"socket,id=console,path={spec.console_socket},server=on,wait=off,"
                         f"logfile={spec.console_log},logappend=off",
             "-serial", "chardev:console"]
    argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", " ".join(spec.cmdline)]
    # snapshot=on: every guest boots the one cached image; its writes are discarded at exit.
    argv += ["-drive", f"file={spec.root_image},format=raw,if=none,id=root,snapshot=on",
             "-device", "virtio-blk-pci,drive=root,bus=pcie.0"]
    for share in spec.shares:
        ro = ",readonly=on" if share.readonly else ""
        argv += ["-fsdev", f"local,id=fs-{share.tag},path={share.path},security_model=none{ro}",
                 "-device", f"virtio-9p-pci,fsdev=fs-{share.tag},mount_tag={share.tag},bus=pcie.0"]
    for nic in spec.nics:
        argv += nic_args(nic)
    argv += cxl_args(spec)
    return argv
