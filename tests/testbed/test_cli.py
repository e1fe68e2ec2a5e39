"""The CLI on bad input: a clear message, a non-zero exit, and no QEMU started."""
import os
import subprocess

import pytest

from conftest import REPO

TB = ["/usr/bin/python3", str(REPO / "testbed" / "tb")]


def run(*args, env=None):
    return subprocess.run([*TB, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def qemu_count():
    out = subprocess.run(["pgrep", "-c", "-f", "process=snaptier-clitest"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


@pytest.mark.parametrize("body,message", [
    ('name = "clitest"\ncolour = 1\n[[host]]\nname="a"\nrole="compute"\n', "unknown key 'colour'"),
    ('name = "clitest"\n[[host]]\nname="a"\nrole="compute"\nmemory="900G"\n', "host[0].memory"),
    ('name = "clitest"\n[[host]]\nname="a"\nrole="compute"\n[[host]]\nname="a"\nrole="compute"\n', "used twice"),
    ('name = "clitest"\n[[host]]\nname="a"\nrole="compute"\n[[cxl]]\nname="c"\nsize="100M"\nhosts=["a"]\n',
     "cxl[0].size"),
])
def test_bad_topology_up_fails_clearly_and_starts_nothing(tmp_path, body, message):
    topo = tmp_path / "clitest.toml"
    topo.write_text(body)
    r = run("-t", str(topo), "up", env={"SNAPTIER_STATE": str(tmp_path / "state")})
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.startswith("testbed: error:")
    assert qemu_count() == 0


def test_missing_topology_file(tmp_path):
    r = run("-t", str(tmp_path / "nope.toml"), "validate")
    assert r.returncode == 2 and "no such topology file" in r.stderr


def test_validate_and_argv_of_the_default_topology():
    r = run("validate")
    assert r.returncode == 0 and "3 hosts" in r.stdout
    r = run("argv")
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(l.startswith("qemu-system-x86_64 ") for l in lines)


def test_status_down_and_exec_on_a_topology_that_is_not_up(tmp_path):
    topo = tmp_path / "clitest.toml"
    topo.write_text('name = "clitest"\n[[host]]\nname="a"\nrole="compute"\n')
    env = {"SNAPTIER_STATE": str(tmp_path / "state")}
    assert run("-t", str(topo), "status", env=env).returncode == 1
    down = run("-t", str(topo), "down", env=env)
    assert down.returncode == 0 and "is down (0 QEMU processes stopped)" in down.stderr  # idempotent
    r = run("-t", str(topo), "exec", "a", "--", "true", env=env)
    assert r.returncode == 2 and "is not up" in r.stderr


def test_impossible_resources_are_refused_before_any_qemu(tmp_path):
    topo = tmp_path / "clitest.toml"
    # 20 hosts x 8 GiB cannot fit in this machine's memory.
    hosts = "".join(f'[[host]]\nname="h{i}"\nrole="compute"\nmemory="8G"\n' for i in range(20))
    topo.write_text('name = "clitest"\naccel = "tcg"\n' + hosts)
    r = run("-t", str(topo), "up", env={"SNAPTIER_STATE": str(tmp_path / "state")})
    assert r.returncode == 2 and "needs" in r.stderr and "MiB of RAM" in r.stderr
    assert qemu_count() == 0


def test_one_parser_lists_every_subcommand_and_each_has_its_help():
    from snaptier_testbed.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    names = set(sub.choices)
    assert {"up", "down", "health", "scenario", "chaos", "burst", "matrix"} <= names
    listed = run("--help")
    assert listed.returncode == 0
    for name in names:
        assert name in listed.stdout
        assert run(name, "--help").returncode == 0, name


def test_matrix_usage_errors_come_from_the_one_parser_before_any_guest():
    r = run("matrix", "--functions", "no-such-function")
    assert r.returncode == 2 and "no-such-function" in r.stderr
    r = run("matrix", "--no-such-option")
    assert r.returncode == 2 and "unrecognized arguments: --no-such-option" in r.stderr


def test_the_qemu_backend_imports_nothing_of_the_testbed_at_run_time():
    code = ("import sys; sys.path.insert(0, %r); import snaptier_qemu.argv, snaptier_qemu.process; "
            "print(sorted(m for m in sys.modules if m.startswith('snaptier_testbed')))" % str(REPO / "qemu"))
    r = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
