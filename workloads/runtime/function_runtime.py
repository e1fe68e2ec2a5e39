#!/usr/bin/python3
"""The Python function runtime: load a function folder, run its init(), serve invocations.

    function_runtime.py FUNCTION_DIR --socket PATH --ready PATH [--log PATH] [--config JSON]

Protocol: docs/functions.md. The process is shaped so CRIU can dump it between invocations
and restore it elsewhere, possibly several times at once:

- one thread, one connection at a time, no connection kept after the client closes: at dump
  time the only socket is the listening one (CRIU dumps and rebinds it);
- its own session, stdin and stdout/stderr on /dev/null once ready: no tty, and no regular file
  held open whose size could change between dump and restore (CRIU checks it);
- cwd is "/", so restore does not depend on the directory the instance was started from;
- the socket file is never removed by the runtime: after a restore it may have been renamed to
  another copy's path (see workloads/bin/restore-function), so only the owner of the path
  (whoever started or restored the instance) cleans it up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import stat
import sys
import time
import traceback

# OpenBLAS/OpenMP start one thread per CPU on import; one keeps an instance single-threaded
# (like a one-vCPU serverless sandbox), its snapshot smaller and its results reproducible.
for _thread_variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_thread_variable, "1")
# The function folder may be read-only (/opt/snaptier in the guests); never write .pyc there.
sys.dont_write_bytecode = True

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from function_folder import FunctionFolder, import_function_module, load_function_folder, run_init  # noqa: E402
from function_protocol import (  # noqa: E402
    DEFAULT_MAX_FRAME_BYTES, FrameTooLarge, ProtocolError, TruncatedFrame, decode_message,
    encode_frame, read_frame)

RESERVED_OPS = ("ping", "digest", "stats")
# A client that connects and then says nothing must not block the (single) instance forever.
CONNECTION_IDLE_TIMEOUT_S = 30.0


def pid_seen_from_proc() -> int:
    """This process's pid as /proc (and so criu, ps, kill on the host) sees it.

    Inside a pid namespace os.getpid() is 1; /proc here is the starter's (start-function does not
    mount a new one), so /proc/self names the pid the host uses. After a restore it is the new pid.
    """
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class FunctionInstance:
    def __init__(self, folder: FunctionFolder, config: dict):
        self.folder = folder
        self.config = config
        self.module = None
        self.init_ms = 0.0
        self.invocations = 0
        self.failed_invocations = 0

    def initialize(self) -> None:
        started = time.perf_counter()
        self.module = import_function_module(self.folder)
        if not callable(getattr(self.module, "handle", None)):
            raise TypeError(f"{self.folder.module_path} defines no handle(input)")
        run_init(self.module, self.config)
        self.init_ms = (time.perf_counter() - started) * 1000.0

    def invoke(self, input: dict) -> dict:
        output = self.module.handle(input)
        if not isinstance(output, dict):
            raise TypeError(f"handle() returned {type(output).__name__}, expected a dict")
        return output

    def digest(self) -> dict:
        """SHA-256 over the buffers the function's state() exports (its initialized state).

        Equal digests before a dump and after a restore prove the restored state byte-exact.
        state() returns one bytes-like object (bytes, bytearray, memoryview, numpy array) or a
        list/tuple of them; a function without state() has an empty state.
        """
        state_function = getattr(self.module, "state", None)
        state = state_function() if state_function is not None else b""
        buffers = state if isinstance(state, (list, tuple)) else [state]
        sha256 = hashlib.sha256()
        total_bytes = 0
        for buffer in buffers:
            view = memoryview(buffer)
            if not view.contiguous:
                raise TypeError("state() returned a non-contiguous buffer")
            sha256.update(view)
            total_bytes += view.nbytes
        return {"sha256": sha256.hexdigest(), "state_bytes": total_bytes}

    def stats(self) -> dict:
        return {
            "function": self.folder.name,
            "pid": pid_seen_from_proc(),
            "ns_pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "init_ms": round(self.init_ms, 3),
            "invocations": self.invocations,
            "failed_invocations": self.failed_invocations,
        }


def error_response(request_id, message: str) -> dict:
    return {"id": request_id, "ok": False, "error": message}


def respond(instance: FunctionInstance, message: dict) -> dict:
    request_id = message.get("id")
    started = time.perf_counter()
    try:
        if "op" in message:
            op = message["op"]
            if op == "ping":
                output = {"function": instance.folder.name}
            elif op == "digest":
                output = instance.digest()
            elif op == "stats":
                output = instance.stats()
            else:
                return error_response(request_id, f"unknown op {op!r} (known: {', '.join(RESERVED_OPS)})")
        elif "input" in message:
            if not isinstance(message["input"], dict):
                return error_response(request_id, "input must be a JSON object")
            instance.invocations += 1
            try:
                output = instance.invoke(message["input"])
            except Exception:
                instance.failed_invocations += 1
                raise
        else:
            return error_response(request_id, "a request needs \"input\" (an object) or \"op\"")
    except Exception as error:  # the function's bug or bad input: report it, keep serving
        return error_response(request_id, f"{type(error).__name__}: {error}")
    response = {"id": request_id, "ok": True, "output": output,
                "duration_ms": round((time.perf_counter() - started) * 1000.0, 3)}
    try:
        encode_frame(response)  # refuse here what the wire cannot carry (sets, NaN, objects)
    except (TypeError, ValueError) as error:
        return error_response(request_id, f"output is not JSON-serializable: {error}")
    return response


def serve_connection(instance: FunctionInstance, connection: socket.socket, max_frame_bytes: int) -> None:
    """Answer frames on one connection until the client closes it or breaks the framing."""
    while True:
        try:
            payload = read_frame(connection, max_frame_bytes)
        except FrameTooLarge as error:
            # The oversized body is not read, so the stream cannot be resynchronized: say why,
            # then close this connection (others are unaffected).
            connection.sendall(encode_frame(error_response(None, f"{error}; closing connection")))
            return
        except TruncatedFrame:
            return
        if payload is None:
            return
        try:
            message = decode_message(payload)
        except ProtocolError as error:
            # The frame boundary is intact, so the connection stays usable.
            connection.sendall(encode_frame(error_response(None, str(error))))
            continue
        connection.sendall(encode_frame(respond(instance, message)))


def serve(instance: FunctionInstance, listener: socket.socket, max_frame_bytes: int) -> None:
    while True:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(CONNECTION_IDLE_TIMEOUT_S)
            try:
                serve_connection(instance, connection, max_frame_bytes)
            except OSError:
                pass  # client went away or timed out; the next one is served


def bind_listener(socket_path: str) -> socket.socket:
    # A stale socket file (from a killed instance) is replaced; any other file is refused.
    try:
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    return listener


def write_ready_file(path: str, content: dict) -> None:
    # Write then rename, so a waiter never reads half a file.
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as ready_file:
        json.dump(content, ready_file)
        ready_file.write("\n")
    os.rename(temporary, path)


def detach_from_terminal_and_files() -> None:
    """stdin, stdout, stderr -> /dev/null, which also closes the startup log (fds 1 and 2 were its
    only references)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a snaptier function folder on a Unix socket.")
    parser.add_argument("function_dir")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--ready", required=True, help="file written (JSON) once the instance serves")
    parser.add_argument("--log", help="startup log (init errors); closed once ready")
    parser.add_argument("--config", default="{}", help="JSON object overriding function.toml [config]")
    parser.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    # Descriptors inherited from whoever started us (a pipe to ssh or pytest, a shell's saved
    # stdin) would be dumped with the instance and tie the snapshot to processes outside it.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    arguments = parse_arguments(argv)
    if arguments.log:
        log_fd = os.open(arguments.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    # Own session: no controlling terminal, and the dumped tree's session is inside the tree
    # (else criu needs --shell-job). Fails harmlessly if we already lead a session/group.
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()
        except PermissionError:
            pass
    os.chdir("/")
    # Ask for a clean exit on SIGTERM. (A pid-namespace init only receives signals it handles.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    socket_path = os.path.abspath(arguments.socket)
    ready_path = os.path.abspath(arguments.ready)
    try:
        folder = load_function_folder(arguments.function_dir)
        config = dict(folder.config)
        overrides = json.loads(arguments.config)
        if not isinstance(overrides, dict):
            raise ValueError("--config must be a JSON object")
        config.update(overrides)
        instance = FunctionInstance(folder, config)
        instance.initialize()
        listener = bind_listener(socket_path)
    except Exception:
        traceback.print_exc()
        print(f"function_runtime: {arguments.function_dir} failed to initialize", file=sys.stderr)
        return 1

    detach_from_terminal_and_files()
    write_ready_file(ready_path, {
        "function": folder.name,
        "pid": pid_seen_from_proc(),
        "ns_pid": os.getpid(),
        "socket": socket_path,
        "init_ms": round(instance.init_ms, 3),
        "startup_ms": round((time.perf_counter() - started) * 1000.0, 3),
    })
    serve(instance, listener, arguments.max_frame_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
