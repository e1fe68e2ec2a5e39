"""The native backend: topology rules, the host description, refusals before anything starts, and
(where this machine has the guests' rootfs and root) a real up/down that leaves nothing behind."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from snaptier_testbed import native
from snaptier_testbed.machine import NATIVE_CXL_DEVICE, Runtime, describe_native, hosts_file_text, native_cxl_dir
from snaptier_testbed.topology import TopologyError, parse_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]


def doc(**extra):
    d = {"name": "nt", "backend": "native",
         "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"}, {"name": "c", "role": "compute"}],
         "cxl": [{"name": "c0", "size": "256M", "hosts": ["a", "b"]}],
         "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b", "c"], "rdma": False}]}
    d.update(extra)
    return d


def test_native_topology_defaults_to_a_shm_cxl_file():
    t = parse_topology(doc())
    assert t.backend == "native" and t.cxl[0].emulation == "shm"
    assert parse_topology({"host": [{"name": "a", "role": "compute"}]}).backend == "qemu"


@pytest.mark.parametrize("d,message", [
    (doc(backend="docker"), r"backend: 'docker' is not one of qemu, native"),
    (doc(accel="kvm"), r"accel: native hosts run on this machine's CPU"),
    (doc(cxl=[{"name": "c0", "size": "256M", "hosts": ["a"], "emulation": "type3"}]), r"cxl\[0\]\.emulation: 'type3'"),
    ({**doc(), "backend": "qemu", "cxl": [{"name": "c0", "size": "256M", "hosts": ["a"], "emulation": "shm"}]},
     r"cxl\[0\]\.emulation: 'shm' is not one of type3, nvdimm"),
])
def test_native_topology_refusals_name_the_key(d, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(d)


def test_every_host_gets_its_own_namespaces_addresses_and_the_shared_cxl_file(tmp_path):
    t = parse_topology(doc())
    rt = Runtime(repo=REPO, state_dir=tmp_path, image_dir=tmp_path, accel="native", boot_id="b1")
    specs = describe_native(t, rt, tmp_path / "rootfs")
    assert len({s.netns for s in specs}) == 3 and all(s.netns.startswith("snaptier-nt-") for s in specs)
    assert len({s.tag for s in specs}) == 3
    addresses = [p.address for s in specs for p in s.ports]
    assert addresses == ["10.9.0.1/24", "10.9.0.2/24", "10.9.0.3/24"]
    assert len({p.switch_port for s in specs for p in s.ports}) == 3          # one bridge port each
    assert len({p.switch_netns for s in specs for p in s.ports}) == 1         # one bridge per link
    cxl_binds = {s.name: [b for b in s.binds if b.target == NATIVE_CXL_DEVICE] for s in specs}
    # On the topology's own tmpfs (huge pages: processes map the file in place), not /dev/shm.
    assert [b.source for b in cxl_binds["a"]] == [native_cxl_dir(t) / "snaptier-nt-c0.raw"]
    assert cxl_binds["a"][0].source == cxl_binds["b"][0].source and not cxl_binds["a"][0].readonly
    assert cxl_binds["c"] == []
    repo_bind = next(b for b in specs[0].binds if b.target == "/opt/snaptier")
    assert repo_bind.readonly and repo_bind.source == REPO
    params = dict(specs[0].params)
    assert params["SNAPTIER_CXL_SIZE"] == str(256 << 20) and params["SNAPTIER_BOOT"] == "b1"
    assert "SNAPTIER_RXE" not in params
    assert all(f"10.9.0.{i + 1} {h}" in hosts_file_text(t) for i, h in enumerate("abc"))


def test_an_rdma_link_is_refused_with_the_missing_module_named(monkeypatch):
    t = parse_topology(doc(link=[{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b"], "rdma": True}]))
    monkeypatch.setattr(native.container, "rxe_missing_reason", lambda: "this machine's kernel has no rdma_rxe module")
    problems = native.preflight(t)
    assert len(problems) == 1 and "l0" in problems[0] and "rdma_rxe" in problems[0]
    monkeypatch.setattr(native.container, "rxe_missing_reason", lambda: None)
    assert native.preflight(t) == []


def test_validate_and_up_refuse_an_rdma_link_without_rxe_and_make_nothing(tmp_path):
    if native.container.rxe_missing_reason() is None:
        pytest.skip("this machine's kernel has rdma_rxe: the refusal does not apply")
    topo = tmp_path / "nrdma.toml"
    topo.write_text('backend = "native"\n[[host]]\nname = "a"\nrole = "compute"\n'
                    '[[link]]\nname = "l0"\nsubnet = "10.9.0.0/24"\nhosts = ["a"]\nrdma = true\n')
    env = {**os.environ, "SNAPTIER_STATE": str(tmp_path / "state")}
    for cmd in ("validate", "up"):
        r = subprocess.run([*TB, "-t", str(topo), cmd], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and "rdma_rxe" in r.stderr, r.stderr
    assert not any("snaptier-nrdma" in n for n in native.container.netns_list())


def test_a_missing_rootfs_is_refused_clearly(tmp_path):
    topo = tmp_path / "nroot.toml"
    topo.write_text('backend = "native"\n[[host]]\nname = "a"\nrole = "compute"\n')
    r = subprocess.run([*TB, "-t", str(topo), "up", "--rootfs", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "SNAPTIER_STATE": str(tmp_path / "state")})
    assert r.returncode == 2 and "does not exist" in r.stderr and str(tmp_path / "nope") in r.stderr


# ---------------------------------------------------------------- real hosts on this machine
def cached_rootfs() -> Path | None:
    cache = Path(os.environ.get("SNAPTIER_CACHE", "/var/cache/snaptier"))
    ready = sorted(cache.glob("rootfs-*.READY"), key=lambda p: p.stat().st_mtime) if cache.is_dir() else []
    return Path(str(ready[-1])[:-len(".READY")]) if ready else None


def machine_can_run_native_hosts() -> str | None:
    if os.geteuid() != 0:
        return "native hosts need root"
    if cached_rootfs() is None:
        return "no guest rootfs built here yet (make image)"
    if not native.GUEST_AGENT.exists():
        return "the agent is not built for the rootfs yet (make guest-agent)"
    if native.container.missing_tools():
        return f"missing {native.container.missing_tools()}"
    return None


@pytest.fixture
def native_topology(tmp_path):
    reason = machine_can_run_native_hosts()
    if reason:
        pytest.skip(reason)
    name = f"ptest{os.getpid() % 10000}"
    topo = tmp_path / f"{name}.toml"
    topo.write_text(f'name = "{name}"\nbackend = "native"\n'
                    '[[host]]\nname = "a"\nrole = "compute"\n[[host]]\nname = "b"\nrole = "compute"\n'
                    '[[cxl]]\nname = "c0"\nsize = "256M"\nhosts = ["a", "b"]\n'
                    '[[link]]\nname = "l0"\nsubnet = "10.91.0.0/24"\nhosts = ["a", "b"]\nrdma = false\n')
    env = {**os.environ, "SNAPTIER_STATE": str(tmp_path / "state")}

    def tb(*args, timeout=120):
        return subprocess.run([*TB, "-t", str(topo), *args], capture_output=True, text=True, timeout=timeout, env=env)
    yield name, tb
    tb("down")


def leftovers(name: str) -> list[str]:
    left = [f"netns {n}" for n in native.container.netns_list() if n.startswith(f"snaptier-{name}-")]
    left += [f"shm {p}" for p in Path("/dev/shm").glob(f"snaptier-{name}-*")]
    cxl_dir = Path("/run/snaptier-native") / name
    left += [f"cxl tmpfs {cxl_dir}"] if cxl_dir.exists() else []
    ps = subprocess.run(["pgrep", "-f", f"process=snaptier-{name}-"], capture_output=True, text=True).stdout.split()
    return left + [f"process {p}" for p in ps]


def test_native_hosts_come_up_share_cxl_reach_each_other_and_leave_nothing_behind(native_topology):
    name, tb = native_topology
    r = tb("up", "--rootfs", str(cached_rootfs()))
    assert r.returncode == 0, r.stderr
    st = json.loads(tb("status", "--json").stdout)
    assert st["backend"] == "native" and all(h["ready"] for h in st["hosts"])
    again = tb("up", "--rootfs", str(cached_rootfs()))
    assert again.returncode == 2 and "already up" in again.stderr
    # Each host is its own machine: its own name and pid 1, the peer reachable on the link.
    r = tb("exec", "a", "--", "hostname; cat /proc/1/cmdline | tr '\\0' ' '; ping -c1 -W2 b >/dev/null && echo reach")
    assert r.returncode == 0 and r.stdout.split()[0] == "a" and "native-init" in r.stdout and "reach" in r.stdout
    # Bytes written through one host's CXL file are what the other host reads.
    w = tb("exec", "a", "--", "python3 /opt/snaptier/testbed/guest/daxprobe.py put n0nce")
    seen = tb("exec", "b", "--", "python3 /opt/snaptier/testbed/guest/daxprobe.py wait n0nce 5")
    tb("exec", "a", "--", "python3 /opt/snaptier/testbed/guest/daxprobe.py restore")
    assert w.returncode == 0 and json.loads(seen.stdout)["seen"] is True
    assert tb("exec", "a", "--", "touch /opt/snaptier/x").returncode != 0   # the checkout is read-only
    assert tb("down").returncode == 0
    assert leftovers(name) == []
    assert tb("down").returncode == 0                                       # idempotent


def test_a_namespace_name_clash_is_refused_and_the_foreign_namespace_kept(native_topology):
    name, tb = native_topology
    foreign = f"snaptier-{name}-host-b"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        r = tb("up", "--rootfs", str(cached_rootfs()))
        assert r.returncode == 2 and foreign in r.stderr and "already exists" in r.stderr
        assert foreign in native.container.netns_list()
        assert [x for x in leftovers(name) if x != f"netns {foreign}"] == []
    finally:
        subprocess.run(["ip", "netns", "delete", foreign])
