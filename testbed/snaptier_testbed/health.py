"""Health checks of a running topology, with numbers: CXL device and speed per host, cross-host
CXL sharing, RDMA one-sided reads from every compute host to every memory node (perftest over
rxe), and `criu check` in compute hosts. Prints a table, writes health.json, exits 0 only if all
checks pass."""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict

from . import launcher
from .launcher import run_in, say
from .report import Check, print_checks, skipped
from .state import state_dir_for
from .topology import MiB, Topology

PROBE = "python3 /opt/snaptier/testbed/guest/daxprobe.py"


def _json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON in output: {text.strip()[-200:]!r}")


def check_cxl_devices(topo: Topology) -> list[Check]:
    out = []
    for dev in topo.cxl:
        for host in dev.hosts:
            r = run_in(topo, host, f"{PROBE} info")
            try:
                info = _json_line(r.stdout)
                # An nvdimm devdax namespace keeps its info block (2 MiB) at the front; a native
                # host's shm file is the whole device.
                overhead = 16 * MiB if dev.emulation == "nvdimm" else 0
                size_ok = dev.size - overhead <= info["size_bytes"] <= dev.size
                ok = r.returncode == 0 and size_ok
                detail = (f"{info['device']} {info['size_bytes'] // MiB} MiB ({info['emulation']}), "
                          f"read {info['read_mb_s']} MB/s, write {info['write_mb_s']} MB/s")
                if not size_ok:
                    detail += f" — expected {dev.size // MiB} MiB"
            except (ValueError, KeyError) as e:
                ok, info, detail = False, {}, f"probe failed: {e} {r.stderr.strip()[-200:]}"
            out.append(Check(f"cxl device {dev.name}", host, ok, detail, info))
            if info:
                mode = info.get("in_place", "none")
                ok = mode in ("file", "loaded")
                detail = {"file": "a private mapping of the file is copy-on-write",
                          "loaded": "snaptier_cow lends the dax device copy-on-write (/dev/snaptier-cow)",
                          "failed": "snaptier_cow did not load (see the guest console); restores copy CXL pages",
                          }.get(mode, "snaptier_cow.ko is not built (guests/build-agent.sh); restores copy CXL pages")
                out.append(Check(f"in place {dev.name}", host, ok, detail, {"in_place": mode}))
    return out


def check_cxl_sharing(topo: Topology) -> list[Check]:
    out = []
    for dev in topo.cxl:
        if len(dev.hosts) < 2:
            continue
        # Every host writes once; every other host must see it.
        for writer in dev.hosts:
            nonce = secrets.token_hex(6)
            w = run_in(topo, writer, f"{PROBE} put {nonce}")
            try:
                for reader in dev.hosts:
                    if reader == writer:
                        continue
                    r = run_in(topo, reader, f"{PROBE} wait {nonce} 10", timeout=30)
                    try:
                        res = _json_line(r.stdout)
                    except ValueError:
                        res = {"seen": False}
                    ok = w.returncode == 0 and r.returncode == 0 and res.get("seen", False)
                    detail = (f"value written by {writer} read by {reader} after {res.get('after_s', '?')} s"
                              if ok else f"{reader} did not see {writer}'s value ({r.stderr.strip()[-200:]})")
                    out.append(Check(f"cxl shared {writer}->{reader}", reader, ok, detail, res))
            finally:
                run_in(topo, writer, f"{PROBE} restore")
    return out


def _perftest(topo, server, server_ip, client, tool, extra, port, timeout=90):
    # The server runs detached under a timeout so that a lost client can never leave it behind.
    run_in(topo, server, f"nohup timeout 60 {tool} -d rxe0 -x 1 -F -p {port} {extra} > /tmp/{tool}-{port}.log 2>&1 &")
    deadline = time.monotonic() + 30
    while True:
        r = run_in(topo, client, f"timeout 50 {tool} -d rxe0 -x 1 -F -p {port} {extra} {server_ip}", timeout=timeout)
        if r.returncode == 0 or time.monotonic() > deadline:
            return r
        time.sleep(1)  # the server may not listen yet


def check_rdma(topo: Topology) -> list[Check]:
    out = []
    port = 18600
    memnodes = [h for h in topo.hosts if h.role == "memory"]
    if not memnodes:
        return [skipped("rdma read", "-", "no memory node in this topology: no RDMA pool to read "
                        "(placements keep cold pages in the file tier)")]
    for mem in memnodes:
        link = topo.link_of(mem.name)
        mem_ip = str(link.address_of(mem.name).ip)
        for host in [h for h in topo.hosts if h.role == "compute" and topo.link_of(h.name) == link]:
            port += 1
            lat = _perftest(topo, mem.name, mem_ip, host.name, "ib_read_lat", "-s 4096 -n 200", port)
            port += 1
            bw = _perftest(topo, mem.name, mem_ip, host.name, "ib_read_bw", "-s 65536 -D 2", port)
            values = {}
            m = re.search(r"^\s*4096\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", lat.stdout, re.M)
            if m:
                values.update(lat_min_us=float(m.group(1)), lat_typical_us=float(m.group(3)), lat_avg_us=float(m.group(4)))
            m = re.search(r"^\s*65536\s+\d+\s+([\d.]+)\s+([\d.]+)", bw.stdout, re.M)
            if m:
                values.update(bw_avg_mib_s=float(m.group(2)))
            ok = lat.returncode == 0 and bw.returncode == 0 and "lat_typical_us" in values and "bw_avg_mib_s" in values
            if ok:
                detail = (f"4 KiB read latency {values['lat_typical_us']:.0f} us typical, "
                          f"64 KiB read bandwidth {values['bw_avg_mib_s']:.1f} MiB/s")
            else:
                detail = "perftest failed: " + (lat.stderr + bw.stderr).strip()[-300:]
            out.append(Check(f"rdma read {host.name}->{mem.name}", host.name, ok, detail, values))
    return out


def check_criu(topo: Topology) -> list[Check]:
    out = []
    for h in topo.hosts:
        if h.role != "compute":
            continue
        r = run_in(topo, h.name, "criu --version | head -1; criu check 2>&1 | tail -1")
        lines = r.stdout.strip().splitlines()
        ok = r.returncode == 0 and bool(lines) and lines[-1].strip() == "Looks good."
        version = lines[0].replace("Version: ", "criu ") if lines else "?"
        out.append(Check("criu check", h.name, ok, f"{version}: {lines[-1] if lines else r.stderr.strip()}", {}))
    return out


def run_health(topo: Topology, json_out: bool = False) -> int:
    launcher.load_running(topo)
    t0 = time.monotonic()
    checks: list[Check] = []
    for name, fn in (("CXL devices", check_cxl_devices), ("CXL sharing", check_cxl_sharing),
                     ("RDMA reads", check_rdma), ("CRIU", check_criu)):
        say(f"health: {name}")
        checks += fn(topo)
    passed = sum(c.ok and not c.skipped for c in checks)
    failed = sum(not c.ok for c in checks)
    summary = {
        "cxl_shared": "yes" if any(c.check.startswith("cxl shared") for c in checks) and
                      all(c.ok for c in checks if c.check.startswith("cxl")) else "no",
        "rdma_read": "none" if any(c.skipped for c in checks if c.check.startswith("rdma")) else
                     "ok" if all(c.ok for c in checks if c.check.startswith("rdma")) and
                     any(c.check.startswith("rdma") for c in checks) else "failed",
        "criu": "ok" if all(c.ok for c in checks if c.check == "criu check") else "failed",
    }
    report = {"topology": topo.name, "backend": topo.backend, "seconds": round(time.monotonic() - t0, 1),
              "passed": passed, "failed": failed, "skipped": sum(c.skipped for c in checks), "summary": summary, "checks": [asdict(c) for c in checks]}
    (state_dir_for(topo.name) / "health.json").write_text(json.dumps(report, indent=1) + "\n")
    if json_out:
        print(json.dumps(report, indent=1))
        return 0 if failed == 0 else 1
    return print_checks(f"health of topology {topo.name} ({report['seconds']} s)", checks, "health",
                        (f"CXL shared: {summary['cxl_shared']}; RDMA read: {summary['rdma_read']}; "
                         f"criu: {summary['criu']}",))
