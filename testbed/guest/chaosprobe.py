#!/usr/bin/python3
"""Host-side helpers of `tb chaos`, run inside a testbed host (guest or native).

  chaosprobe.py strays WORK_DIR
      JSON list of what a restore must never leave behind on this host: criu processes,
      processes naming a path under WORK_DIR (the agent's function work_dir: instances and
      restored copies carry their socket path there) and stopped tasks.
  chaosprobe.py kill-agent-during PATTERN AGENT_PID_FILE TIMEOUT_S -- COMMAND...
      Runs COMMAND (a tierctl restore); as soon as a process whose command line matches the
      regular expression PATTERN exists (PATTERN "@stopped": a task in job-control stop, as
      criu restore --leave-stopped leaves a restore before its resume), stops the agent (SIGSTOP: the restore freezes where it
      is), records the host's processes, and kills the agent (SIGKILL). Prints one JSON object:
      whether the trigger was seen, after how long, what ran at that moment, COMMAND's exit.
  chaosprobe.py wait-file PATH TIMEOUT_S -- COMMAND...
      Waits until PATH exists (a barrier the testbed creates), then runs COMMAND; prints one JSON
      object with its exit status, output and when it started (CLOCK_REALTIME).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time


def processes():
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        out.append({"pid": int(name), "ppid": int(fields[1]), "state": fields[0], "comm": comm,
                    "args": " ".join(argv)[:300]})
    return out


def strays(work_dir):
    root = work_dir.rstrip("/") + "/"
    mine = {os.getpid(), os.getppid()}
    found = []
    for p in processes():
        if p["pid"] in mine or p["state"] == "Z":
            continue
        why = []
        if p["comm"] == "criu":
            why.append("criu")
        if root in p["args"]:
            why.append("names " + root)
        if p["state"] in ("T", "t"):
            why.append("stopped")
        if why:
            found.append({**p, "why": why})
    return found


def kill_agent_during(pattern, pid_file, timeout_s, command):
    regex = None if pattern == "@stopped" else re.compile(pattern)
    agent = int(open(pid_file).read().split()[0])

    def fires(p):
        if p["pid"] in (child.pid, agent):
            return False
        # "T" (job control), not "t": criu holds the tasks it restores in a tracing stop.
        return (p["state"] == "T" and p["comm"] != "criu") if regex is None else bool(regex.search(p["args"]))
    t0 = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    while time.monotonic() - t0 < timeout_s and child.poll() is None:
        for p in processes():
            if fires(p):
                seen = p
                break
        if seen:
            break
        time.sleep(0.001)
    result = {"triggered": seen is not None, "trigger": seen, "agent_pid": agent,
              "after_ms": round((time.monotonic() - t0) * 1000, 1)}
    if seen:
        os.kill(agent, signal.SIGSTOP)
        result["at_kill"] = [p for p in processes() if p["pid"] != child.pid]
        os.kill(agent, signal.SIGKILL)
    try:
        out, err = child.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    result.update(rc=child.returncode, stdout=out[-2000:], stderr=err[-2000:])
    return result


def wait_file(path, timeout_s, command):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return {"rc": 124, "stdout": "", "stderr": f"{path} did not appear within {timeout_s} s", "started": None}
        time.sleep(0.001)
    started = time.time()
    r = subprocess.run(command, capture_output=True, text=True)
    return {"rc": r.returncode, "stdout": r.stdout[-4000:], "stderr": r.stderr[-2000:], "started": started}


def main(argv):
    if len(argv) >= 2 and argv[0] == "strays":
        print(json.dumps(strays(argv[1])))
        return 0
    if "--" in argv:
        head, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        if len(head) == 4 and head[0] == "kill-agent-during" and command:
            print(json.dumps(kill_agent_during(head[1], head[2], float(head[3]), command)))
            return 0
        if len(head) == 3 and head[0] == "wait-file" and command:
            print(json.dumps(wait_file(head[1], float(head[2]), command)))
            return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
