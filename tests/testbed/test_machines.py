"""Libvirt topologies on several machines, without the machines: the topology rules for a
machine's URI and directory, where each machine keeps its files, the cable that joins a link's
switches, and — against a fake `ssh` that runs the "remote" command here and a fake `virsh` —
what is copied once, what is refused before anything is defined, and how a host on another
machine is seen running. The real two-machine run (sshd on loopback) is CI stage 5."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from snaptier_testbed import launcher, libvirt_backend, machines
from snaptier_testbed.topology import DEFAULT_REMOTE_DIR, SshTarget, TopologyError, load_topology, parse_topology

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]


def two(**machine_two):
    return {"name": "mt", "backend": "libvirt",
            "machine": [{"name": "one", "uri": "qemu:///system"},
                        {"name": "two", "uri": "qemu+ssh://root@m2.example:2222/system", **machine_two}],
            "host": [{"name": "a", "role": "compute"}, {"name": "b", "role": "compute"},
                     {"name": "m", "role": "memory", "machine": "two", "pool": "256M"}],
            "cxl": [{"name": "c0", "size": "256M", "hosts": ["a", "b"]}],
            "link": [{"name": "l0", "subnet": "10.9.0.0/24", "hosts": ["a", "b", "m"]}]}


# ---------------------------------------------------------------- topology rules
def test_a_uri_naming_a_host_is_another_machine_reached_by_ssh():
    t = parse_topology(two())
    one, other = t.machines
    assert not one.remote and one.ssh is None
    assert other.remote and other.ssh == SshTarget(host="m2.example", user="root", port=2222)
    assert other.ssh.destination == "root@m2.example" and other.dir == DEFAULT_REMOTE_DIR
    assert parse_topology(two(dir="/srv/tb/")).machines[1].dir == "/srv/tb"
    single = parse_topology({"backend": "libvirt", "uri": "qemu+ssh://lab7/system", "host": [{"name": "a", "role": "compute"}]})
    assert single.machines[0].ssh == SshTarget(host="lab7")


@pytest.mark.parametrize("d,message", [
    (two(uri="qemu+tcp://m2.example/system"), r"machine\[1\]\.uri: .* names machine 'm2.example' over 'tcp'.*over ssh"),
    (two(dir="srv/tb"), r"machine\[1\]\.dir: 'srv/tb' is not an absolute directory"),
    (two(dir="/srv/../etc"), r"machine\[1\]\.dir: '/srv/../etc' is not an absolute directory"),
    (two(dir="/"), r"machine\[1\]\.dir: '/' is not an absolute directory below /"),
    ({**two(), "machine": [{"name": "one", "uri": "qemu:///system", "dir": "/x"}, two()["machine"][1]]},
     r"machine\[0\]\.dir: machine 'one' is this machine"),
])
def test_machine_uri_and_dir_refusals_name_the_key(d, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(d)


def test_the_two_machine_topology_keeps_cxl_on_one_and_the_memory_node_on_two():
    t = load_topology(REPO / "testbed/topologies/two-machines.toml")
    assert [m.remote for m in t.machines] == [False, True]
    assert {t.machine_of(h).name for h in t.cxl[0].hosts} == {"one"}
    memory = [h for h in t.hosts if h.role == "memory"]
    assert memory and all(h.machine == "two" for h in memory)
    assert t.links[0].rdma and set(t.links[0].hosts) == {h.name for h in t.hosts}


# ---------------------------------------------------------------- where files live, how links join
def test_each_machine_keeps_the_topologys_files_in_its_own_directory(tmp_path):
    t = parse_topology(two(dir="/srv/tb"))
    p = machines.places(t, tmp_path / "run" / "mt")
    assert p["one"].local and p["one"].root == tmp_path / "run" / "mt"
    assert not p["two"].local and p["two"].root == Path("/srv/tb/run/mt") and p["two"].cache == Path("/srv/tb/cache")
    assert p["two"].command(["cat", "/a b"])[-3:] == ["root@m2.example", "--", "cat '/a b'"]
    assert ["-p", "2222"] == p["two"].ssh_argv()[-4:-2]


def test_a_link_across_machines_is_one_switch_each_cabled_to_the_first_hosts():
    t = parse_topology(two())
    p = machines.places(t, Path("/state/mt"))
    on = libvirt_backend.link_places(t, p, t.links[0])
    assert [x.name for x in on] == ["one", "two"]
    argv = libvirt_backend.cable_argv("l0", on[0], on[1])
    left, right = argv[1:argv.index("=")], argv[argv.index("=") + 1:]
    assert argv[0] == "dpipe"
    assert left == ["vde_plug", "/state/mt/switch-l0"]                       # this machine's switch
    assert right[0] == "ssh" and right[-3:] == ["root@m2.example", "--", f"vde_plug {DEFAULT_REMOTE_DIR}/run/mt/switch-l0"]
    assert "BatchMode=yes" in right and "ServerAliveInterval=5" in right     # never prompts, ends on a dead peer


def test_a_guest_on_another_machine_is_reached_through_that_machine():
    assert launcher.proxy_command(["root@m2.example", 2222]) == \
        "ssh -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR -p 2222 -W %h:%p root@m2.example"
    assert "-p" not in launcher.proxy_command(["m2", None])


# ---------------------------------------------------------------- against a fake ssh
FAKE_SSH = r"""#!/bin/bash
# A stand-in for ssh: the "remote" command runs here, with PATH=$FAKE_REMOTE_PATH when set.
echo "$*" >> "$FAKE_SSH_LOG"
[ -f "$FAKE_SSH_DOWN" ] && { echo "ssh: connect to host m2.example port 2222: Connection refused" >&2; exit 255; }
while [ $# -gt 0 ] && [ "$1" != -- ]; do shift; done
shift
if [ -n "${FAKE_REMOTE_PATH:-}" ]; then exec env PATH="$FAKE_REMOTE_PATH" /bin/sh -c "$*"; fi
exec /bin/sh -c "$*"
"""


@pytest.fixture
def ssh_here(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    monkeypatch.setenv("FAKE_SSH_DOWN", str(tmp_path / "down"))
    t = parse_topology(two(dir=str(tmp_path / "m2")))

    class Here:
        topology = t
        place = machines.places(t, tmp_path / "state")["two"]
        down = tmp_path / "down"

        def calls(self):
            return log.read_text().splitlines() if log.exists() else []
    return Here()


def test_a_copy_is_made_once_and_a_half_made_one_is_replaced(ssh_here, tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    for name, data in (("vmlinuz", b"k" * 100), ("root.img", b"r" * 5000)):
        (src / name).write_bytes(data)
    place = ssh_here.place
    (place.cache / ".image-1.partial").mkdir(parents=True)
    (place.cache / ".image-1.partial" / "junk").write_text("from a copy cut off\n")
    copy = machines.cached_copy(place, src, ["vmlinuz", "root.img"], "image-1", "the image")
    assert copy == place.cache / "image-1"
    assert (copy / "root.img").read_bytes() == b"r" * 5000 and not (copy / "junk").exists()
    assert not (place.cache / ".image-1.partial").exists()
    copies = sum("tar -x" in c for c in ssh_here.calls())
    (src / "root.img").write_bytes(b"changed")      # a new image has a new key; the same key is not copied again
    assert machines.cached_copy(place, src, ["vmlinuz", "root.img"], "image-1", "the image") == copy
    assert sum("tar -x" in c for c in ssh_here.calls()) == copies == 1
    assert (copy / "root.img").read_bytes() == b"r" * 5000


def test_a_new_tree_copy_keeps_only_the_newest_of_its_kind(ssh_here, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_text("x\n")
    place = ssh_here.place
    for key in ("tree-1", "tree-2", "tree-3"):
        machines.cached_copy(place, src, ["f"], key, "a tree", keep=2)
    machines.cached_copy(place, src, ["f"], "image-1", "an image", keep=2)   # another kind: not counted
    assert sorted(p.name for p in place.cache.iterdir()) == ["image-1", "tree-2", "tree-3"]


def test_a_failed_copy_says_so_and_leaves_no_complete_copy(ssh_here, tmp_path):
    src = tmp_path / "img"
    src.mkdir()
    (src / "vmlinuz").write_bytes(b"k")
    ssh_here.place.cache.parent.write_text("a file where the machine's directory should be\n")
    with pytest.raises(launcher.TestbedError, match="machine two: copying 1 files to .* failed: .*Not a directory"):
        machines.cached_copy(ssh_here.place, src, ["vmlinuz"], "image-2", "the image")
    assert not (ssh_here.place.cache / "image-2" / machines.READY).exists()


def test_the_guest_tree_is_the_checkout_and_the_guest_builds_programs(tmp_path):
    repo = tmp_path / "repo"
    (repo / "build" / "guest" / "tier-agent" / "CMakeFiles").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("build/\n")
    (repo / "README.md").write_text("hello\n")
    (repo / "build" / "guest" / "tier-agent" / "tier-agent").write_bytes(b"\x7fELF")
    (repo / "build" / "guest" / "tier-agent" / "agent.cpp.o").write_bytes(b"obj")
    (repo / "build" / "guest" / "tier-agent" / "CMakeFiles" / "x.txt").write_text("cmake\n")
    files, key = machines.guest_tree(repo)
    assert set(files) == {".gitignore", "README.md", "build/guest/tier-agent/tier-agent"}
    (repo / "build" / "guest" / "tier-agent" / "tier-agent").write_bytes(b"\x7fELF v2")
    assert machines.guest_tree(repo)[1] != key       # by content: a rebuilt agent is copied again


def test_an_unreachable_machine_is_named_and_nothing_is_defined(ssh_here, tmp_path):
    ssh_here.down.touch()
    topo = tmp_path / "mt.toml"
    topo.write_text(TOML.format(dir=tmp_path / "m2"))
    fake_virsh = tmp_path / "bin" / "virsh"
    fake_virsh.write_text('#!/bin/sh\necho "$*" >> "$FAKE_SSH_LOG.virsh"\necho "Running hypervisor: QEMU 10.0.2"\n')
    fake_virsh.chmod(0o755)
    env = {**os.environ, "SNAPTIER_STATE": str(tmp_path / "state")}
    for command in ("up", "validate"):
        r = subprocess.run([*TB, "-t", str(topo), command], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2, r.stderr
        assert "machine two (root@m2.example) does not answer over ssh (ssh: connect to host m2.example port 2222: " \
               "Connection refused)" in r.stderr
    virsh_calls = Path(str(tmp_path / "ssh.log") + ".virsh").read_text().split("\n")
    assert not any(" define " in f" {c} " or " start " in f" {c} " for c in virsh_calls)
    r = subprocess.run([*TB, "-t", str(topo), "down"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "does not answer over ssh" in r.stderr and "is down" in r.stderr


def test_a_machine_without_the_tools_the_launcher_runs_there_is_refused(ssh_here, tmp_path, monkeypatch):
    empty = tmp_path / "empty-path"     # a shell, and nothing else
    empty.mkdir()
    (empty / "sh").symlink_to("/bin/sh")
    monkeypatch.setenv("FAKE_REMOTE_PATH", str(empty))
    problems = libvirt_backend.preflight(ssh_here.topology)
    assert any(p.startswith("machine two lacks qemu-system-x86_64, qemu-img, vde_switch, vde_plug") for p in problems), problems


@pytest.mark.skipif(not shutil.which("pgrep"), reason="pgrep (procps, a testbed package) is not installed")
def test_a_host_on_another_machine_runs_if_its_process_there_carries_its_tag(ssh_here, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    tagged = subprocess.Popen(["bash", "-c", "exec -a 'qemu -name guest=x,process=snaptier-mt-m' sleep 60"])
    longer = subprocess.Popen(["bash", "-c", "exec -a 'qemu -name process=snaptier-mt-m0' sleep 60"])
    try:
        for pid in (tagged.pid, longer.pid):
            for _ in range(100):
                if "process=" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    break
        (state / "m.pid").write_text(f"{tagged.pid}\n")
        assert libvirt_backend.running_hosts(ssh_here.topology, state) == {"m": tagged.pid}
        assert any("/proc/" in c for c in ssh_here.calls())          # looked for on machine two
        assert machines.pid_of(ssh_here.place, "snaptier-mt-m") == tagged.pid   # not the longer tag
        (state / "m.pid").write_text(f"{longer.pid}\n")
        assert libvirt_backend.running_hosts(ssh_here.topology, state) == {}
    finally:
        for p in (tagged, longer):
            p.kill()
            p.wait()


TOML = """name = "mt"
backend = "libvirt"
accel = "tcg"
[[machine]]
name = "one"
uri = "qemu:///system"
[[machine]]
name = "two"
uri = "qemu+ssh://root@m2.example:2222/system"
dir = "{dir}"
[[host]]
name = "a"
role = "compute"
memory = "512M"
[[host]]
name = "m"
role = "memory"
memory = "512M"
pool = "128M"
machine = "two"
[[link]]
name = "l0"
subnet = "10.9.0.0/24"
hosts = ["a", "m"]
"""
