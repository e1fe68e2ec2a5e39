"""The runtime over a real Unix socket: requests, reserved ops, bad frames, and the CLI tools."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from conftest import WORKLOADS
from function_folder import import_function_module, load_function_folder, run_init
from function_protocol import DEFAULT_MAX_FRAME_BYTES, call, decode_message, encode_frame, read_frame

INVOKE = str(WORKLOADS / "bin" / "invoke")
START_FUNCTION = str(WORKLOADS / "bin" / "start-function")


def exchange(connection, raw_bytes):
    """Send raw bytes, return the decoded response frame (None if the server closed)."""
    connection.sendall(raw_bytes)
    payload = read_frame(connection)
    return None if payload is None else decode_message(payload)


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_ready_file_and_reserved_ops(start_instance):
    instance = start_instance("helloworld")
    ready = instance.ready
    assert ready["pid"] == instance.process.pid and ready["ns_pid"] == instance.process.pid
    assert ready["socket"] == instance.socket_path and ready["function"] == "helloworld"
    assert ready["init_ms"] >= 0
    response, _ = call(instance.socket_path, {"id": 7, "op": "ping"})
    assert response == {"id": 7, "ok": True, "output": {"function": "helloworld"},
                        "duration_ms": response["duration_ms"]}
    stats, _ = call(instance.socket_path, {"id": "s", "op": "stats"})
    assert stats["ok"] and stats["output"]["pid"] == instance.process.pid
    assert stats["output"]["rss_bytes"] > 1 << 20
    # The instance holds nothing but its listening socket and /dev/null (what CRIU will dump).
    fds = {os.readlink(f"/proc/{instance.process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{instance.process.pid}/fd")}
    assert {fd.split(":")[0] for fd in fds} == {"/dev/null", "socket"}


def test_invocation_and_handler_error(start_instance):
    instance = start_instance("helloworld")
    response, _ = call(instance.socket_path, {"id": 1, "input": {"name": "host"}})
    assert response["ok"] and response["output"] == {"message": "Hello, host!"} and response["id"] == 1
    assert response["duration_ms"] >= 0
    response, _ = call(instance.socket_path, {"id": 2, "input": {"name": 3}})
    assert response == {"id": 2, "ok": False, "error": "ValueError: name must be a string"}
    stats, _ = call(instance.socket_path, {"op": "stats"})
    assert stats["output"]["invocations"] == 2 and stats["output"]["failed_invocations"] == 1


def test_bad_requests_get_clear_errors_and_the_connection_survives(start_instance):
    instance = start_instance("helloworld")
    with instance.connect() as connection:
        cases = [
            (frame_of(b"{not json"), "frame is not JSON"),
            (frame_of(b"\xff\xfe"), "frame is not UTF-8"),
            (frame_of(b"[1, 2]"), "message must be a JSON object, got list"),
            (encode_frame({"id": 3, "op": "reboot"}), "unknown op 'reboot' (known: ping, digest, stats)"),
            (encode_frame({"id": 4}), 'a request needs "input" (an object) or "op"'),
            (encode_frame({"id": 5, "input": [1]}), "input must be a JSON object"),
        ]
        for raw, error in cases:
            response = exchange(connection, raw)
            assert response["ok"] is False and response["error"].startswith(error), response
        # Same connection, still served.
        assert exchange(connection, encode_frame({"id": 6, "input": {}}))["output"] == {"message": "Hello, world!"}


def test_oversized_frame_closes_only_that_connection(start_instance):
    instance = start_instance("helloworld", extra_args=["--max-frame-bytes", "1024"])
    with instance.connect() as connection:
        response = exchange(connection, struct.pack(">I", 1025) + b"x" * 16)
        assert response["ok"] is False
        assert response["error"] == "frame of 1025 bytes exceeds the limit of 1024 bytes; closing connection"
        # Closed by the server (with our unread bytes still queued there, so it may be a reset).
        try:
            assert read_frame(connection) is None
        except ConnectionResetError:
            pass
    with instance.connect() as connection:
        assert exchange(connection, struct.pack(">I", DEFAULT_MAX_FRAME_BYTES))["ok"] is False
    assert call(instance.socket_path, {"op": "ping"})[0]["ok"]


def test_truncated_frame_and_silent_client_do_not_stop_the_server(start_instance):
    instance = start_instance("helloworld")
    with instance.connect() as connection:
        connection.sendall(b"\x00\x00")          # half a header, then hang up
    with instance.connect() as connection:
        connection.sendall(struct.pack(">I", 100) + b"{}")  # a frame cut short
    assert call(instance.socket_path, {"op": "ping"})[0]["ok"]


def test_digest_is_stable_and_covers_the_state(start_instance):
    instance = start_instance("json_serdes", config={"records": 50})
    first, _ = call(instance.socket_path, {"op": "digest"})
    call(instance.socket_path, {"input": {"rounds": 2}})
    second, _ = call(instance.socket_path, {"op": "digest"})
    assert first["ok"] and first["output"] == second["output"]
    # The digest is SHA-256 over what state() exports: here the canonical JSON of the document.
    folder = load_function_folder(str(WORKLOADS / "json_serdes"))
    module = import_function_module(folder)
    run_init(module, {**folder.config, "records": 50})
    assert first["output"]["sha256"] == hashlib.sha256(module.state()).hexdigest()
    assert first["output"]["state_bytes"] == len(module.state())


def test_init_failure_exits_nonzero_with_the_reason_in_the_log(tmp_path):
    bad_function = tmp_path / "broken"
    bad_function.mkdir()
    (bad_function / "function.toml").write_text('description = "init raises"\n')
    (bad_function / "function.py").write_text("def init():\n    raise RuntimeError('no model file')\n"
                                              "def handle(input):\n    return {}\n")
    log = tmp_path / "broken.log"
    result = subprocess.run([sys.executable, "-B", str(WORKLOADS / "runtime" / "function_runtime.py"),
                             str(bad_function), "--socket", str(tmp_path / "s"), "--ready", str(tmp_path / "r"),
                             "--log", str(log)], stdin=subprocess.DEVNULL, timeout=15)
    assert result.returncode == 1
    assert "RuntimeError: no model file" in log.read_text()
    assert not (tmp_path / "r").exists()


def test_invoke_cli(start_instance, tmp_path):
    instance = start_instance("helloworld")
    helloworld = str(WORKLOADS / "helloworld")

    def invoke(*args):
        return subprocess.run([sys.executable, "-B", INVOKE, *args], capture_output=True, text=True, timeout=15)

    result = invoke(instance.socket_path, "--example", helloworld, "--check", helloworld, "--timing")
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)
    assert response["output"] == {"message": "Hello, snaptier!"} and response["client_ms"] >= 0
    assert invoke(instance.socket_path, "--op", "digest").returncode == 0
    result = invoke(instance.socket_path, "--op", "reboot")
    assert result.returncode == 1 and "unknown op" in result.stderr
    # A wrong expectation fails the check.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "function.toml").write_text('description = "x"\n[example]\ninput = { name = "snaptier" }\n'
                                         '[example.expect]\nmessage = "Bye"\n')
    result = invoke(instance.socket_path, "--example", str(wrong), "--check", str(wrong))
    assert result.returncode == 1 and "check failed" in result.stderr
    result = invoke(str(tmp_path / "nobody.sock"), "--op", "ping", "--timeout", "2")
    assert result.returncode == 3


def test_start_function_prints_the_pid_to_dump(tmp_path):
    # Plain (no pid namespace: unshare needs root, and CRIU is exercised in the guests).
    result = subprocess.run([START_FUNCTION, str(WORKLOADS / "helloworld"), "--socket", str(tmp_path / "s.sock"),
                             "--ready", str(tmp_path / "ready"), "--timeout", "15"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    try:
        assert json.loads((tmp_path / "ready").read_text())["pid"] == pid
        assert os.getsid(pid) == pid  # its own session
        assert call(str(tmp_path / "s.sock"), {"op": "ping"})[0]["ok"]
    finally:
        os.kill(pid, 9)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_start_function_in_a_pid_namespace(tmp_path):
    result = subprocess.run([START_FUNCTION, str(WORKLOADS / "helloworld"), "--pidns", "--socket",
                             str(tmp_path / "s.sock"), "--ready", str(tmp_path / "ready"), "--timeout", "15"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    try:
        stats, _ = call(str(tmp_path / "s.sock"), {"op": "stats"})
        assert stats["output"]["pid"] == pid and stats["output"]["ns_pid"] == 1
    finally:
        os.kill(pid, 9)


def test_start_function_reports_init_failure(tmp_path):
    bad_function = tmp_path / "broken"
    bad_function.mkdir()
    (bad_function / "function.toml").write_text('description = "import fails"\n')
    (bad_function / "function.py").write_text("import no_such_module_here\n")
    result = subprocess.run([START_FUNCTION, str(bad_function), "--socket", str(tmp_path / "s.sock"),
                             "--ready", str(tmp_path / "ready"), "--timeout", "15"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "exited before it was ready" in result.stderr and "no_such_module_here" in result.stderr


def test_start_function_runs_a_native_entry_point(tmp_path):
    # A folder with an executable `run` is started as `run --socket --ready --log`; this one
    # stands in for a native binary by exec'ing the Python runtime on helloworld.
    native = tmp_path / "native"
    native.mkdir()
    (native / "function.toml").write_text('description = "native stand-in"\n')
    run = native / "run"
    run.write_text(f'#!/bin/sh\nexec {sys.executable} -B {WORKLOADS / "runtime" / "function_runtime.py"} '
                   f'{WORKLOADS / "helloworld"} "$@"\n')
    run.chmod(0o755)
    result = subprocess.run([START_FUNCTION, str(native), "--socket", str(tmp_path / "s.sock"),
                             "--ready", str(tmp_path / "ready"), "--timeout", "15"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    try:
        assert call(str(tmp_path / "s.sock"), {"input": {}})[0]["output"] == {"message": "Hello, world!"}
    finally:
        os.kill(pid, 9)


def test_output_the_wire_cannot_carry_is_an_error(start_instance, tmp_path):
    function_dir = tmp_path / "unserializable"
    function_dir.mkdir()
    (function_dir / "function.toml").write_text('description = "returns what JSON cannot hold"\n')
    (function_dir / "function.py").write_text(
        "def handle(input):\n    return {'nan': float('nan')} if input.get('nan') else {'set': {1, 2}}\n")
    instance = start_instance(function_dir)
    for input in ({"nan": True}, {}):
        response, _ = call(instance.socket_path, {"id": 1, "input": input})
        assert response["ok"] is False and response["error"].startswith("output is not JSON-serializable"), response
    assert call(instance.socket_path, {"op": "digest"})[0]["output"]["state_bytes"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_start_function_timeout_leaves_no_process(tmp_path):
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "function.toml").write_text('description = "init never finishes in time"\n')
    (slow / "function.py").write_text("import time\ndef init():\n    time.sleep(60)\ndef handle(input):\n    return {}\n")
    result = subprocess.run([START_FUNCTION, str(slow), "--pidns", "--socket", str(tmp_path / "s.sock"),
                             "--ready", str(tmp_path / "ready"), "--timeout", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "not ready after 1s" in result.stderr
    time.sleep(0.2)
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if str(slow).encode() in cmdline.read():
                    survivors.append(pid)
        except OSError:
            pass
    assert survivors == []
