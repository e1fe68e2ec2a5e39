"""memops, the native test function: started the way the agent starts it (bin/start-function),
over its socket: the protocol, the byte checks, the digest, and that a wrong byte is caught."""

import hashlib
import json
import os
import struct
import subprocess

import pytest

from conftest import REPO, WORKLOADS
from function_folder import check_expected, load_function_folder
from function_protocol import call, decode_message, encode_frame, read_frame

START_FUNCTION = str(WORKLOADS / "bin" / "start-function")
INVOKE = str(WORKLOADS / "bin" / "invoke")
BUILD = REPO / "build" / "host"
PROGRAM = BUILD / "workloads" / "memops" / "memops"
FOLDER = WORKLOADS / "memops"
RANGES = ["ro", "sealed", "written", "discarded", "moved", "grown", "unmapped", "zero", "cold"]

pytestmark = pytest.mark.skipif(not os.access(PROGRAM, os.X_OK),
                                reason=f"{PROGRAM} is not built (cmake --build build/host --target memops)")


@pytest.fixture
def memops(tmp_path):
    """memops(config=None, extra_env=None) -> (pid, socket path), started by start-function
    from this checkout's host build; killed at teardown."""
    started = []

    def start(config=None, pidns=False):
        socket_path = tmp_path / f"m{len(started)}.sock"
        command = [START_FUNCTION, str(FOLDER), "--socket", str(socket_path),
                   "--ready", str(tmp_path / f"m{len(started)}.ready"), "--timeout", "30"]
        if config is not None:
            command += ["--config", json.dumps(config)]
        if pidns:
            command.append("--pidns")
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "SNAPTIER_BUILD_DIR": str(BUILD)})
        assert result.returncode == 0, result.stderr
        pid = int(result.stdout)
        started.append(pid)
        return pid, str(socket_path)

    yield start
    for pid in started:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def splitmix64(z):
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def expected_state(seed, ro_pages, range_pages, with_cold=True):
    """The bytes of memops' state as init() builds them, computed independently: word i of
    range r is splitmix64(seed << 48 ^ r << 40 ^ i), little-endian; `zero` is zeros; `written`
    (scratch the invocations change) is not part of it."""
    out = bytearray()
    for r, name in enumerate(RANGES):
        words = (ro_pages if name == "ro" else range_pages) * 4096 // 8
        if name == "written" or (name == "cold" and not with_cold):
            continue
        if name == "zero":
            out += bytes(words * 8)
            continue
        base = ((seed << 48) ^ (r << 40)) & ((1 << 64) - 1)
        out += struct.pack(f"<{words}Q", *(splitmix64(base ^ i) for i in range(words)))
    return bytes(out)


def test_start_function_runs_the_built_program_and_its_example_passes(memops, tmp_path):
    pid, socket_path = memops()
    assert os.readlink(f"/proc/{pid}/exe") == str(PROGRAM)
    ready = json.loads((tmp_path / "m0.ready").read_text())
    assert ready["function"] == "memops" and ready["pid"] == pid and ready["socket"] == socket_path
    folder = load_function_folder(str(FOLDER))
    assert folder.is_native and folder.native_program == "memops"
    for round in range(3):  # every invocation leaves the state as init() built it
        response, _ = call(socket_path, {"id": round, "input": folder.example_input}, timeout_s=60)
        assert response["ok"] and response["id"] == round, response
        assert check_expected(folder, response["output"]) == []
    digest, _ = call(socket_path, {"op": "digest"})
    state = expected_state(1, 1024, 64)
    assert digest["output"] == {"sha256": hashlib.sha256(state).hexdigest(), "state_bytes": len(state)}
    # What CRIU will dump: the listening socket and /dev/null, no shared library.
    fds = {os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0] for fd in os.listdir(f"/proc/{pid}/fd")}
    assert fds == {"/dev/null", "socket"}
    maps = open(f"/proc/{pid}/maps").read()
    assert ".so" not in maps, "memops is static: its snapshot maps no shared library"
    stats, _ = call(socket_path, {"op": "stats"})
    assert stats["output"]["invocations"] == 3 and stats["output"]["failed_invocations"] == 0
    assert set(stats["output"]["ranges"]) == set(RANGES)
    result = subprocess.run([INVOKE, socket_path, "--example", str(FOLDER), "--check", str(FOLDER)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_digest_is_sha256_of_the_bytes_init_builds(memops):
    config = {"seed": 7, "ro_pages": 3, "range_pages": 4}
    _, socket_path = memops(config)
    state = expected_state(7, 3, 4)
    before, _ = call(socket_path, {"op": "digest"})
    assert before["output"] == {"sha256": hashlib.sha256(state).hexdigest(), "state_bytes": len(state)}
    invoked, _ = call(socket_path, {"input": {}}, timeout_s=60)
    assert invoked["ok"], invoked
    # The invocation hashes what it touched (not `cold`, which must stay cold for a profile).
    touched = expected_state(7, 3, 4, with_cold=False)
    assert invoked["output"]["checked_sha256"] == hashlib.sha256(touched).hexdigest()
    assert invoked["output"]["hashed_bytes"] == len(touched)
    assert call(socket_path, {"op": "digest"})[0]["output"] == before["output"], "invocations leave the state alone"
    # Every byte of every range but `cold` is checked at least at the start, the end and in the
    # child: as many bytes as the state (which has `cold` and not `written`, both 4 pages).
    assert invoked["output"]["checked_bytes"] >= 3 * len(state)
    other = expected_state(8, 3, 4)
    assert hashlib.sha256(other).hexdigest() != before["output"]["sha256"], "the seed changes every range"


@pytest.mark.skipif(os.geteuid() != 0, reason="writing another process's memory needs root")
@pytest.mark.parametrize("name", ["ro", "sealed", "discarded", "moved", "grown", "unmapped", "zero"])
def test_one_wrong_byte_fails_the_invocation_naming_range_and_offset(memops, name):
    pid, socket_path = memops({"ro_pages": 8, "range_pages": 8})
    address, size = call(socket_path, {"op": "stats"})[0]["output"]["ranges"][name]
    offset = size - 4096 + 123  # the last page
    with open(f"/proc/{pid}/mem", "r+b") as mem:
        mem.seek(address + offset)
        original = mem.read(1)
        mem.seek(address + offset)
        mem.write(bytes([original[0] ^ 0x40]))
    response, _ = call(socket_path, {"id": 1, "input": {}}, timeout_s=60)
    assert response["ok"] is False
    assert response["error"].startswith(f"range {name} at the start: byte {offset} (page {offset // 4096}) is 0x"), response
    with open(f"/proc/{pid}/mem", "r+b") as mem:
        mem.seek(address + offset)
        mem.write(original)
    assert call(socket_path, {"input": {}}, timeout_s=60)[0]["ok"]
    stats = call(socket_path, {"op": "stats"})[0]["output"]
    assert stats["invocations"] == 2 and stats["failed_invocations"] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="writing another process's memory needs root")
def test_a_wrong_byte_in_the_cold_range_changes_the_digest_only(memops):
    pid, socket_path = memops({"ro_pages": 4, "range_pages": 4})
    before = call(socket_path, {"op": "digest"})[0]["output"]["sha256"]
    address, _ = call(socket_path, {"op": "stats"})[0]["output"]["ranges"]["cold"]
    with open(f"/proc/{pid}/mem", "r+b") as mem:
        mem.seek(address)
        mem.write(b"\0")
    assert call(socket_path, {"input": {}}, timeout_s=60)[0]["ok"], "invocations never read the cold range"
    assert call(socket_path, {"op": "digest"})[0]["output"]["sha256"] != before


def test_bad_requests_get_the_runtime_s_errors_and_the_connection_survives(memops):
    import socket
    _, socket_path = memops({"ro_pages": 4, "range_pages": 4})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(socket_path)

        def exchange(raw):
            connection.sendall(raw)
            return decode_message(read_frame(connection))

        def frame(payload):
            return struct.pack(">I", len(payload)) + payload

        cases = [
            (frame(b"{not json"), "frame is not JSON"),
            (frame(b"{\"a\": 1} x"), "frame is not JSON"),
            (frame(b"\xff\xfe"), "frame is not UTF-8"),
            (frame(b"[1, 2]"), "message must be a JSON object"),
            (encode_frame({"id": 3, "op": "reboot"}), "unknown op 'reboot' (known: ping, digest, stats)"),
            (encode_frame({"id": 4}), 'a request needs "input" (an object) or "op"'),
            (encode_frame({"id": 5, "input": [1]}), 'a request needs "input" (an object) or "op"'),
        ]
        for raw, error in cases:
            response = exchange(raw)
            assert response["ok"] is False and response["error"].startswith(error), response
        # Any JSON id comes back as it was sent.
        ping = exchange(encode_frame({"op": "ping", "id": {"k": [1, "two", None, 3.5e2]}}))
        assert ping == {"id": {"k": [1, "two", None, 350.0]}, "ok": True, "output": {"function": "memops"}}
        assert exchange(encode_frame({"input": {}}))["ok"]
    # An oversized frame is answered and closes only that connection; a cut frame just closes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(socket_path)
        connection.sendall(struct.pack(">I", (16 << 20) + 1))
        response = decode_message(read_frame(connection))
        assert response["error"] == f"frame of {(16 << 20) + 1} bytes exceeds the limit of {16 << 20} bytes; closing connection"
        assert read_frame(connection) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(socket_path)
        connection.sendall(struct.pack(">I", 100) + b"{}")
    assert call(socket_path, {"op": "ping"})[0]["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_in_a_pid_namespace_it_reports_its_host_pid(memops):
    pid, socket_path = memops({"ro_pages": 4, "range_pages": 4}, pidns=True)
    stats = call(socket_path, {"op": "stats"})[0]["output"]
    assert stats["pid"] == pid and stats["ns_pid"] == 1
    assert call(socket_path, {"input": {}}, timeout_s=60)[0]["ok"], "fork and waitpid as a namespace init"


def test_start_function_says_when_the_program_is_not_built(tmp_path):
    result = subprocess.run([START_FUNCTION, str(FOLDER), "--socket", str(tmp_path / "s.sock"),
                             "--ready", str(tmp_path / "ready"), "--timeout", "5"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "SNAPTIER_BUILD_DIR": str(tmp_path / "no-build")})
    assert result.returncode == 1
    assert "memops is native" in result.stderr and "is not built" in result.stderr, result.stderr
