#!/usr/bin/python3
"""Guest-side probe of the shared CXL device, used by the testbed health check.

  daxprobe.py info                      device, size, sequential read/write speed (JSON)
  daxprobe.py put NONCE                 write a marker into the device's last cache line
  daxprobe.py wait NONCE [TIMEOUT]      wait until that marker is visible here (JSON)
  daxprobe.py wipe-head                 zero the first 2 MiB (the agent's superblock), so that a
                                        benchmark's scratch format is not mistaken for a directory

The marker lives in the last 64 bytes of the device; `put` saves what was there and
`restore` puts it back, so the check never damages data another tool keeps in the region.
"""
import json
import mmap
import os
import sys
import time

CHUNK = 2 << 20  # devdax mappings must be 2 MiB aligned


def device():
    info = json.load(open("/run/snaptier/cxl.json"))
    return info["device"], int(info["size_bytes"]), info["emulation"]


def in_place():
    """How a restored process can map this device privately: "file" (a regular file maps so
    itself), "loaded" (the snaptier_cow module lends a dax device), "none" or "failed"."""
    info = json.load(open("/run/snaptier/cxl.json"))
    return "file" if info["emulation"] == "shm" else info.get("cow_module", "none")


def map_tail(path, size):
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, CHUNK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=size - CHUNK)
    os.close(fd)
    return m


def cmd_info():
    path, size, emulation = device()
    fd = os.open(path, os.O_RDWR)
    span = min(size, 16 << 20)
    m = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
    t0 = time.perf_counter()
    data = m[:span]
    t1 = time.perf_counter()
    scratch = m[span - (4 << 20):span]  # rewrite the same bytes: measures writes, changes nothing
    t2 = time.perf_counter()
    m[span - (4 << 20):span] = scratch
    t3 = time.perf_counter()
    m.close()
    os.close(fd)
    print(json.dumps({"device": path, "size_bytes": size, "emulation": emulation,
                      "read_mb_s": round(len(data) / (t1 - t0) / 1e6, 1),
                      "write_mb_s": round(len(scratch) / (t3 - t2) / 1e6, 1),
                      "in_place": in_place()}))


def cmd_put(nonce):
    path, size, _ = device()
    m = map_tail(path, size)
    saved = "/run/snaptier/daxprobe.saved"
    if not os.path.exists(saved):
        open(saved, "wb").write(m[CHUNK - 64:])
    m[CHUNK - 64:] = f"SNAPTIER-HEALTH {nonce}".encode().ljust(64, b"\0")[:64]
    # No msync: devdax is a direct mapping (msync gives EINVAL). The emulated device is
    # coherent; the agent's directory does the cache-line write-backs real CXL needs.
    m.close()
    print(json.dumps({"written": nonce, "offset": size - 64}))


def cmd_wait(nonce, timeout):
    path, size, _ = device()
    m = map_tail(path, size)
    want = f"SNAPTIER-HEALTH {nonce}".encode()
    t0 = time.monotonic()
    seen = False
    while time.monotonic() - t0 < timeout:
        if m[CHUNK - 64:CHUNK - 64 + len(want)] == want:
            seen = True
            break
        time.sleep(0.05)
    m.close()
    print(json.dumps({"seen": seen, "after_s": round(time.monotonic() - t0, 3)}))
    return 0 if seen else 1


def cmd_restore():
    path, size, _ = device()
    saved = "/run/snaptier/daxprobe.saved"
    if os.path.exists(saved):
        m = map_tail(path, size)
        m[CHUNK - 64:] = open(saved, "rb").read()
        m.close()
        os.unlink(saved)
    print(json.dumps({"restored": True}))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "info"
    if cmd == "info":
        cmd_info()
    elif cmd == "put":
        cmd_put(sys.argv[2])
    elif cmd == "wait":
        sys.exit(cmd_wait(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 10))
    elif cmd == "wipe-head":
        path, size, _ = device()
        fd = os.open(path, os.O_RDWR)
        m = mmap.mmap(fd, CHUNK, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        m[:] = bytes(CHUNK)
        m.close()
        os.close(fd)
        print(json.dumps({"wiped_bytes": CHUNK}))
    elif cmd == "restore":
        cmd_restore()
    else:
        sys.exit(f"daxprobe: unknown command {cmd!r}")
