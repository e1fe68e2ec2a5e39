"""Topology -> machine description -> QEMU command line."""
from pathlib import Path

from snaptier_qemu.argv import qemu_argv
from snaptier_testbed.machine import Runtime, describe
from snaptier_testbed.topology import load_topology, parse_topology
from conftest import REPO

RT = Runtime(repo=Path("/repo"), state_dir=Path("/state"), image_dir=Path("/img"), accel="tcg",
             ssh_ports={"host0": 2201, "host1": 2202, "mem0": 2203}, boot_id="b00t")


def specs(accel="tcg"):
    t = load_topology(REPO / "testbed/topologies/default.toml")
    rt = Runtime(**{**RT.__dict__, "accel": accel})
    return {s.name: s for s in describe(t, rt)}


def opt_values(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_type3_hosts_share_one_backing_file_and_have_the_cxl_topology():
    s = specs()
    a0, a1 = qemu_argv(s["host0"]), qemu_argv(s["host1"])
    backend = [o for o in opt_values(a0, "-object") if o.startswith("memory-backend-file,id=cxl-mem0")]
    assert backend == [o for o in opt_values(a1, "-object") if o.startswith("memory-backend-file,id=cxl-mem0")]
    assert "share=on" in backend[0] and "mem-path=/dev/shm/snaptier-default-cxl0.raw" in backend[0]
    assert f"size={1 << 30}" in backend[0]
    devices = opt_values(a0, "-device")
    assert "pxb-cxl,bus_nr=12,bus=pcie.0,id=cxl.1" in devices
    assert any(d.startswith("cxl-type3,") and "volatile-memdev=cxl-mem0" in d for d in devices)
    assert "q35,cxl=on" in opt_values(a0, "-M")
    assert "cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G" in opt_values(a0, "-M")
    # The Debian kernel refuses to commit a CXL region if the CPU reports a hypervisor.
    assert opt_values(a0, "-cpu") == ["max,hypervisor=off"]


def test_every_pci_device_is_on_pcie0_when_a_cxl_bridge_exists():
    a0 = qemu_argv(specs()["host0"])
    for d in opt_values(a0, "-device"):
        if d.split(",")[0] in ("virtio-blk-pci", "virtio-9p-pci", "virtio-net-pci"):
            assert "bus=pcie.0" in d, d


def test_memory_node_has_no_cxl_and_plain_cpu():
    a = qemu_argv(specs()["mem0"])
    assert not any("cxl" in x for x in opt_values(a, "-device"))
    assert opt_values(a, "-cpu") == ["max"] and opt_values(a, "-M") == ["q35"]
    assert "snaptier.pool=1024M" in opt_values(a, "-append")[0]


def test_kernel_cmdline_once_and_carries_the_host_description():
    a = qemu_argv(specs()["host1"])
    appends = opt_values(a, "-append")
    assert len(appends) == 1  # a second -append silently wins
    words = appends[0].split()
    assert "snaptier.host=host1" in words and "snaptier.cxl=type3" in words
    assert "snaptier.data=52:54:00:5e:00:02,10.77.0.2/24" in words and "snaptier.rxe=1" in words
    assert "snaptier.cxl_format=1" not in words  # host0, first attached, formats
    assert "snaptier.cxl_format=1" in opt_values(qemu_argv(specs()["host0"]), "-append")[0].split()
    assert "net.ifnames=0" in words and "init=/usr/lib/snaptier/init" in words


def test_networking_stays_on_the_machine():
    a = qemu_argv(specs()["host0"])
    netdevs = opt_values(a, "-netdev")
    user = [n for n in netdevs if n.startswith("user,")]
    assert user == ["user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:2201-:22"]
    assert "vde,id=data0,sock=/state/switch-data0" in netdevs
    assert not any(n.startswith(("tap", "bridge")) for n in netdevs)


def test_accelerator_choices():
    assert opt_values(qemu_argv(specs("tcg")["host0"]), "-accel") == ["tcg"]
    assert opt_values(qemu_argv(specs("kvm-then-tcg")["host0"]), "-accel") == ["kvm", "tcg"]


def test_shares_root_disk_and_control_sockets():
    a = qemu_argv(specs()["host0"])
    fsdevs = opt_values(a, "-fsdev")
    assert "local,id=fs-snaptier,path=/repo,security_model=none,readonly=on" in fsdevs
    assert "local,id=fs-shared,path=/state/share,security_model=none" in fsdevs
    assert "file=/img/root.img,format=raw,if=none,id=root,snapshot=on" in opt_values(a, "-drive")
    assert opt_values(a, "-pidfile") == ["/state/host0.pid"]
    assert opt_values(a, "-qmp") == ["unix:/state/host0.qmp,server=on,wait=off"]
    assert a[a.index("-name") + 1] == "host0,process=snaptier-default-host0"


def test_nvdimm_emulation_uses_memory_slots_and_the_same_file():
    doc = {"name": "nv", "host": [{"name": "a", "role": "compute", "memory": "1G"}, {"name": "b", "role": "compute"}],
           "cxl": [{"name": "c", "emulation": "nvdimm", "size": "512M", "hosts": ["a", "b"], "backing": "/tmp/x.raw"}]}
    s = {x.name: x for x in describe(parse_topology(doc), RT)}
    a = qemu_argv(s["a"])
    assert opt_values(a, "-M") == ["q35,nvdimm=on"]
    assert opt_values(a, "-m") == ["1024M,slots=2,maxmem=2560M"]
    assert "nvdimm,id=nvdimm0,memdev=nv0" in opt_values(a, "-device")
    assert any("mem-path=/tmp/x.raw" in o for o in opt_values(qemu_argv(s["b"]), "-object"))


def test_large_cxl_device_gets_a_window_that_covers_it():
    doc = {"host": [{"name": "a", "role": "compute"}], "cxl": [{"name": "c", "size": "6G", "hosts": ["a"]}]}
    a = qemu_argv(describe(parse_topology(doc), RT)[0])
    assert "cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=8G" in opt_values(a, "-M")
