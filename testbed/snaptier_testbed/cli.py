"""testbed/tb's one argument parser: validate, up, down, status, exec, console, health, argv, agents, bench,
scenario, chaos, burst, matrix."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from . import launcher
from .launcher import TestbedError
from .machine import Runtime, describe
from .state import REPO, TestbedState, state_dir_for
from .topology import MiB, TopologyError, load_topology

DEFAULT_TOPOLOGY = REPO / "testbed" / "topologies" / "default.toml"


def cmd_validate(args, topo) -> int:
    problems = []
    if topo.backend == "native":
        from .native import preflight
        problems = preflight(topo)
    elif topo.backend == "libvirt":
        from .libvirt_backend import preflight
        problems = preflight(topo)
    if problems:
        raise TestbedError(f"{topo.source}: cannot run on this machine: " + "; ".join(problems))
    print(f"{topo.source}: ok — {topo.backend} backend, {len(topo.hosts)} hosts, {len(topo.cxl)} CXL devices, "
          f"{len(topo.links)} links")
    return 0


def cmd_argv(args, topo) -> int:
    if topo.backend == "native":
        raise TestbedError("argv prints QEMU command lines; this topology's hosts are native (see 'tb status')")
    sys.path.insert(0, str(REPO / "qemu"))
    from snaptier_qemu.argv import qemu_argv
    from snaptier_qemu.domain_xml import domain_xml
    state_dir = state_dir_for(topo.name)
    runtime = Runtime(repo=REPO, state_dir=state_dir, image_dir=Path(args.image or "IMAGE"),
                      accel={"auto": "kvm-then-tcg"}.get(topo.accel, topo.accel),
                      ssh_ports={h.name: 2200 + i for i, h in enumerate(topo.hosts)})
    if topo.backend != "libvirt":
        for spec in describe(topo, runtime):
            print(shlex.join(qemu_argv(spec)))
        return 0
    from .libvirt_backend import root_overlay
    from .machines import places
    # The domain XML `up` defines (its root overlay is made at up); a host on another machine
    # names that machine's copies and run directory.
    for h in topo.hosts:
        place = places(topo, state_dir)[h.machine]
        here = place.runtime_for(runtime, Path("IMAGE"), "KEY")
        spec = next(s for s in describe(topo, here) if s.name == h.name)
        print(domain_xml(spec, root_overlay(spec, place.root), topo.name, state_dir), end="")
    return 0


def cmd_up(args, topo) -> int:
    launcher.up(topo, image_dir=args.image, boot_timeout=args.boot_timeout, rootfs=args.rootfs)
    return cmd_status(argparse.Namespace(json=False), topo)


def cmd_down(args, topo) -> int:
    launcher.down(topo)
    return 0


def status_of(topo) -> dict:
    state_dir = state_dir_for(topo.name)
    state = TestbedState.load(state_dir)
    running = launcher.running_hosts(topo, state_dir)
    hosts = []
    for h in topo.hosts:
        status_file = state_dir / "share" / "status" / f"{h.name}.json"
        guest = {}
        if h.name in running and status_file.exists():
            try:
                guest = json.loads(status_file.read_text())
            except ValueError:
                pass
        link = topo.link_of(h.name)
        hosts.append({
            "name": h.name, "role": h.role, "machine": h.machine, "running": h.name in running, "pid": running.get(h.name),
            "ready": bool(guest.get("ready")) and state is not None and guest.get("boot_id") == state.boot_id,
            "ssh_port": state.ssh_ports.get(h.name) if state else None,
            "data_address": str(link.address_of(h.name).ip) if link else None,
            "cxl": guest.get("cxl"), "rdma": guest.get("rdma"),
        })
    return {"topology": topo.name, "backend": topo.backend, "up": bool(running), "accel": state.accel if state else None,
            "state_dir": str(state_dir), "hosts": hosts}


def cmd_status(args, topo) -> int:
    st = status_of(topo)
    if getattr(args, "json", False):
        print(json.dumps(st, indent=1))
    else:
        print(f"topology {st['topology']}: {'up' if st['up'] else 'down'}" + (f" ({st['accel']})" if st["up"] else ""))
        several = len(topo.machines) > 1
        print(f"{'host':8} {'role':8} " + (f"{'machine':10} " if several else "")
              + f"{'state':8} {'data addr':12} {'ssh':6} {'cxl':22} rdma")
        for h in st["hosts"]:
            state = "ready" if h["ready"] else ("booting" if h["running"] else "down")
            cxl = f"{h['cxl']['device']} {h['cxl']['size_bytes'] // MiB}M" if h["cxl"] else "-"
            rdma = h["rdma"]["device"] if h["rdma"] else "-"
            print(f"{h['name']:8} {h['role']:8} " + (f"{h['machine']:10} " if several else "")
                  + f"{state:8} {h['data_address'] or '-':12} {h['ssh_port'] or '-'!s:6} {cxl:22} {rdma}")
    return 0 if st["up"] and all(h["ready"] for h in st["hosts"]) else 1


def cmd_exec(args, topo) -> int:
    command = list(args.command) + args.after_separator
    if not command:
        raise TestbedError("exec needs a command: testbed/tb exec HOST -- CMD ...")
    # One string keeps the guest shell's view of quoting the same as the user's.
    proc = launcher.exec_in(topo, args.host, [shlex.join(command)] if len(command) > 1 else command,
                            timeout=args.timeout, capture=False)
    return proc.returncode


def cmd_console(args, topo) -> int:
    state, state_dir = launcher.load_running(topo)
    if topo.backend == "native":
        os.execvp(sys.executable, [sys.executable, str(REPO / "testbed" / "tb"), "-t", str(topo.source),
                                   "exec", args.host, "--", "/bin/bash", "-i"])
    if topo.backend == "libvirt" and topo.machine_of(args.host) and topo.machine_of(args.host).remote:
        from .machines import places
        place = places(topo, state_dir)[topo.machine_of(args.host).name]
        sock = place.root / f"{args.host}.console"
        print(f"console of {args.host} on machine {place.name}: Ctrl-] to leave", file=sys.stderr)
        argv = place.ssh_argv(tty=True) + [shlex.join(["socat", "-,raw,echo=0,escape=0x1d", f"UNIX-CONNECT:{sock}"])]
        os.execvp(argv[0], argv)
    sock = state_dir / f"{args.host}.console"
    if not sock.exists():
        raise TestbedError(f"no console socket for {args.host!r}")
    print(f"console of {args.host}: Ctrl-] to leave", file=sys.stderr)
    os.execvp("socat", ["socat", "-,raw,echo=0,escape=0x1d", f"UNIX-CONNECT:{sock}"])


def cmd_health(args, topo) -> int:
    from .health import run_health
    return run_health(topo, json_out=args.json)


def cmd_agents(args, topo) -> int:
    from . import agents
    if args.action == "start":
        agents.start(topo)
    elif args.action == "stop":
        agents.stop(topo, args.hosts or None)
    elif args.action == "restart":
        agents.stop(topo, args.hosts or None)
        agents.start(topo)
    elif args.action == "config":
        print(agents.write_configs(topo))
    return 0


def cmd_bench(args, topo) -> int:
    from .bench import run_bench, run_restore_bench
    if args.what == "restore":
        return run_restore_bench(topo, size_mib=args.size_mib, rounds=args.rounds)
    return run_bench(topo, size_mib=args.size_mib, iterations=args.iterations, threads=args.threads)


def cmd_scenario(args, topo) -> int:
    import inspect
    from .scenarios import SCENARIOS
    scenario = SCENARIOS[args.name]
    options = {k: v for k, v in (("function", args.function), ("policy", args.policy)) if v}
    takes = inspect.signature(scenario).parameters
    for key in options:
        if key not in takes:
            raise TestbedError(f"scenario {args.name} takes no --{key}")
    return scenario(topo, **options)


def cmd_chaos(args, topo) -> int:
    from .chaos import parse_rows, run_chaos
    from .matrix import available_functions, parse_list
    rows = parse_rows(args.only)
    function = parse_list(args.function, available_functions(), "function", "--function")[0] if args.function \
        else "helloworld"
    return run_chaos(topo, rows, function=function)


def cmd_burst(args, topo) -> int:
    from .burst import plan_from_args, replot, run_burst
    if args.plot:
        return replot(Path(args.plot))
    return run_burst(topo, plan_from_args(topo, args))


def cmd_matrix(args, topo) -> int:
    from .matrix import run_from_args
    return run_from_args(args, topo, **(args.matrix_hooks or {}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="testbed/tb", description="snaptier multi-host QEMU testbed")
    p.add_argument("-t", "--topology", default=os.environ.get("SNAPTIER_TOPOLOGY", str(DEFAULT_TOPOLOGY)),
                   help="topology file (default: %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("validate", help="check the topology file").set_defaults(fn=cmd_validate)
    a = sub.add_parser("argv", help="print the QEMU command line of every host (libvirt: its domain XML)")
    a.add_argument("--image", help="image directory to put in the command lines")
    a.set_defaults(fn=cmd_argv)
    u = sub.add_parser("up", help="build/reuse the guest image and boot the topology")
    u.add_argument("--image", help="use this image directory instead of building one")
    u.add_argument("--rootfs", help="native topologies: use this trixie root file system instead of the cached one")
    u.add_argument("--boot-timeout", type=float, default=float(os.environ.get("SNAPTIER_BOOT_TIMEOUT", 420)))
    u.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the topology's QEMU processes (idempotent)").set_defaults(fn=cmd_down)
    s = sub.add_parser("status", help="what is running (exit 0 only if every host is ready)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)
    e = sub.add_parser("exec", help="run a command in a host: exec HOST -- CMD ...")
    e.add_argument("host")
    e.add_argument("--timeout", type=float, default=None, help="seconds before the command is abandoned")
    e.add_argument("command", nargs="*", help="the command (put it after '--' if it has options)")
    e.set_defaults(fn=cmd_exec)
    c = sub.add_parser("console", help="attach to a host's serial console")
    c.add_argument("host")
    c.set_defaults(fn=cmd_console)
    h = sub.add_parser("health", help="check CXL sharing, RDMA and CRIU in every host; print a table")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_health)
    g = sub.add_parser("agents", help="tier agents in the guests: config | start | stop | restart [HOST...]")
    g.add_argument("action", choices=["config", "start", "stop", "restart"])
    g.add_argument("hosts", nargs="*")
    g.set_defaults(fn=cmd_agents)
    b = sub.add_parser("bench", help="tiers: tier_bench per tier in the guests; restore: page installation "
                                     "from each tier beside its read bandwidth (JSON + CSV in the state dir)")
    b.add_argument("what", nargs="?", choices=["tiers", "restore"], default="tiers")
    b.add_argument("--size-mib", type=int, default=16)
    b.add_argument("--rounds", type=int, default=3, help="restore: rounds (medians reported)")
    b.add_argument("--iterations", type=int, default=2000)
    b.add_argument("--threads", type=int, default=4, help="the random reads again with this many readers at once")
    b.set_defaults(fn=cmd_bench)
    sc = sub.add_parser("scenario", help="run an end-to-end scenario on the running topology")
    from .scenarios import SCENARIOS
    sc.add_argument("name", choices=sorted(SCENARIOS))
    sc.add_argument("--function", help="restore-everywhere: the function (default helloworld)")
    sc.add_argument("--policy", help="restore-everywhere: the restore policy (default reap)")
    sc.set_defaults(fn=cmd_scenario)
    from .chaos import ROWS
    ch = sub.add_parser("chaos", help="fault injection, one promise per row (corrupt CXL pages, a killed agent, "
                                      "full tiers, racing publishers, a stalled memory node); print a table")
    ch.add_argument("--only", metavar="ROW,...", help=f"rows to run, in this order (default: all): {','.join(ROWS)}")
    ch.add_argument("--function", help="the function snapshotted by the rows (default helloworld)")
    ch.set_defaults(fn=cmd_chaos)
    from . import burst
    bu = sub.add_parser("burst", help="many instances of one snapshot restored at once on every host, from one "
                                      "shared copy; table, CSV, plot",
                        description="Snapshot FUNCTION once on the first host, then for every instance count and "
                                    "policy restore that many instances at once on every host (in parallel). "
                                    "Exit 0 iff every instance answered right with an equal state digest and "
                                    "nothing was left running.")
    bu.add_argument("--function", default=burst.DEFAULT_FUNCTION, help="a folder of workloads/ (default %(default)s)")
    bu.add_argument("--policies", "--policy", dest="policies", metavar="P[,P...]", default=burst.DEFAULT_POLICIES,
                    help="restore policies (default %(default)s); ratios are against criu-eager if listed, "
                         "else the first")
    bu.add_argument("--instances", metavar="N[,N...]", default=burst.DEFAULT_INSTANCES,
                    help=f"instances per host, 1..{burst.MAX_INSTANCES} (default %(default)s)")
    bu.add_argument("--hosts", metavar="H[,H...]",
                    help="compute hosts that restore, the first also snapshots (default: every compute host "
                         "sharing its copies; the first alone where the topology has no RDMA pool)")
    bu.add_argument("--allow-busy", action="store_true",
                    help="instances the agent refused at its bound (busy) do not fail the run")
    bu.add_argument("--out", help="results directory (default: run/<topology>/results/burst-<UTC time>/)")
    bu.add_argument("--keep", action="store_true", help="keep the snapshot in the store afterwards")
    bu.add_argument("--plot", metavar="RESULTS_DIR", help="only print the table and draw burst.png of an earlier run")
    bu.set_defaults(fn=cmd_burst)
    from . import matrix
    m = sub.add_parser("matrix", help="restore every function with every policy across two hosts; table, CSV, plot",
                       description="Snapshot each function on one host, restore it with each policy on another "
                                   "(forwarded by the snapshot host's agent). Exit 0 iff every cell is ok, "
                                   "answers correctly and has an equal state digest.")
    matrix.add_arguments(m)
    m.set_defaults(fn=cmd_matrix)
    return p


def main(argv: list[str] | None = None, matrix_hooks: dict | None = None) -> int:
    """`matrix_hooks`: the guest runner and agent starter `tb matrix` uses, replaced by tests."""
    p = build_parser()
    # Everything after the first '--' is the guest command, untouched by option parsing.
    argv = list(sys.argv[1:] if argv is None else argv)
    after = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = p.parse_args(argv)
    args.after_separator = after
    args.matrix_hooks = matrix_hooks
    try:
        topo = load_topology(args.topology)
        return args.fn(args, topo)
    except (TopologyError, TestbedError) as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
