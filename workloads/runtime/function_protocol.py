"""Wire format of a function instance: framed JSON over a Unix stream socket.

A frame is a 4-byte big-endian payload length followed by that many bytes of UTF-8 JSON, which
must be an object. docs/functions.md is the reference; this module is the one implementation
shared by the runtime (server side), bin/invoke and the tests (client side).
"""

from __future__ import annotations

import json
import socket
import struct
import time

FRAME_HEADER = struct.Struct(">I")
# Big enough for any input a benchmark function takes, small enough that a garbage header
# (e.g. someone writing text into the socket) cannot make the instance allocate gigabytes.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class TruncatedFrame(ProtocolError):
    """The connection ended in the middle of a frame."""


def encode_frame(message: dict) -> bytes:
    # allow_nan=False: NaN and Infinity are not JSON, and other clients' parsers reject them.
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return FRAME_HEADER.pack(len(payload)) + payload


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks = []
    remaining = count
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes | None:
    """The next frame's payload, or None if the peer closed cleanly between frames."""
    header = _recv_exact(sock, FRAME_HEADER.size)
    if not header:
        return None
    if len(header) < FRAME_HEADER.size:
        raise TruncatedFrame(f"connection closed inside a frame header ({len(header)} of 4 bytes)")
    (size,) = FRAME_HEADER.unpack(header)
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    payload = _recv_exact(sock, size)
    if len(payload) < size:
        raise TruncatedFrame(f"connection closed inside a frame ({len(payload)} of {size} bytes)")
    return payload


def decode_message(payload: bytes) -> dict:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(f"frame is not UTF-8: {error}") from None
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"frame is not JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(message).__name__}")
    return message


def call(socket_path: str, message: dict, timeout_s: float = 30.0,
         max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[dict, float]:
    """Send one request on a fresh connection; return (response, round-trip milliseconds).

    The connection is closed afterwards: an instance must hold no client connection when it is
    dumped (CRIU cannot dump a socket whose peer lives outside the dumped tree).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        started = time.perf_counter()
        sock.connect(socket_path)
        sock.sendall(encode_frame(message))
        payload = read_frame(sock, max_bytes)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    if payload is None:
        raise ProtocolError("instance closed the connection without a response")
    return decode_message(payload), elapsed_ms
