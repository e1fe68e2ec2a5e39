import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = REPO / "workloads"
RUNTIME = WORKLOADS / "runtime" / "function_runtime.py"
sys.path.insert(0, str(WORKLOADS / "runtime"))
sys.dont_write_bytecode = True  # the function folders are shared with read-only guests

READY_TIMEOUT_S = 15.0


def function_names():
    return sorted(path.parent.name for path in WORKLOADS.glob("*/function.toml"))


def python_function_names():
    """The folders served by the Python runtime (function.py); native ones have their own tests."""
    from function_folder import load_function_folder
    return [name for name in function_names() if not load_function_folder(str(WORKLOADS / name)).is_native]


class RunningInstance:
    def __init__(self, process, socket_path, ready_path, log_path):
        self.process = process
        self.socket_path = str(socket_path)
        self.ready_path = ready_path
        self.log_path = log_path

    @property
    def ready(self):
        return json.loads(self.ready_path.read_text())

    def connect(self, timeout_s=10.0):
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(timeout_s)
        connection.connect(self.socket_path)
        return connection


@pytest.fixture
def start_instance(tmp_path):
    """start_instance(name, config=None) -> RunningInstance: the Python runtime as a plain
    subprocess (no pid namespace, no CRIU), killed at teardown."""
    started = []

    def start(name, config=None, extra_args=()):
        # name: a folder under workloads/, or a Path to any function folder.
        function_dir = name if isinstance(name, Path) else WORKLOADS / name
        name = function_dir.name
        socket_path = tmp_path / f"{name}.sock"
        ready_path = tmp_path / f"{name}.ready"
        log_path = tmp_path / f"{name}.log"
        command = [sys.executable, "-B", str(RUNTIME), str(function_dir),
                   "--socket", str(socket_path), "--ready", str(ready_path), "--log", str(log_path),
                   *extra_args]
        if config is not None:
            command += ["--config", json.dumps(config)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        started.append(process)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready_path.exists():
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}: {log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} not ready after {READY_TIMEOUT_S}s: {log_path.read_text()}")
            time.sleep(0.02)
        return RunningInstance(process, socket_path, ready_path, log_path)

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=10)
