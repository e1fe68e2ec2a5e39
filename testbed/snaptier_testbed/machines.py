"""The machines of a libvirt topology as the launcher reaches them: this one directly, another
over ssh (the host its qemu+ssh URI names, with the user's own ssh configuration). Everything
`up` and `down` do on a machine — run a command, read a file, copy the guest image and the
guest tree there once, start a switch — goes through its Place, so the libvirt backend has one
code path wherever a host runs.

A remote machine keeps, under its `dir` (topology.DEFAULT_REMOTE_DIR unless the topology says):
  cache/image-<key>/   the guest image (vmlinuz, initrd.img, root.img), copied once per image
  cache/tree-<sha>/    what its guests mount at /opt/snaptier: the checkout's files and the
                       guest build's programs (no objects), copied once per content
  run/<topology>/      the topology's files there: share/ (its guests' /shared), root overlays,
                       consoles and serial logs, switch sockets; `owner` names the checkout
                       whose `down` may remove it
This machine's hosts keep using the checkout's run directory and the local image cache.
"""
from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from .launcher import TestbedError, free_port, say
from .machine import Runtime
from .topology import Machine, Topology

# The launcher's own ssh to a machine: never prompts, gives up on a dead peer.
MACHINE_SSH_OPTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                    "-o", "ServerAliveCountMax=6", "-o", "LogLevel=ERROR"]
COMMAND_TIMEOUT = 60
COPY_TIMEOUT = 1800          # a 2 GiB image over a slow link
IMAGE_FILES = ("vmlinuz", "initrd.img", "root.img")
# Left out of the guest tree: the guest build's intermediates (guests run its programs only).
TREE_SKIP_DIRS = ("CMakeFiles",)
TREE_SKIP_SUFFIXES = (".o", ".a", ".cmd", ".d", ".ninja_deps", ".ninja_log")
READY = ".READY"


@dataclass(frozen=True)
class Place:
    machine: Machine
    root: Path                 # the topology's run directory there
    cache: Path | None = None  # remote: where copies by content live

    @property
    def local(self) -> bool:
        return not self.machine.remote

    @property
    def name(self) -> str:
        return self.machine.name

    def ssh_argv(self, tty: bool = False) -> list[str]:
        """ssh to this machine, up to the remote command (which follows as one word)."""
        target = self.machine.ssh
        assert target is not None, "a local place has no ssh"
        argv = ["ssh", *MACHINE_SSH_OPTS, "-t" if tty else "-T"]
        if target.port:
            argv += ["-p", str(target.port)]
        return argv + [target.destination, "--"]

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this machine, as a command line run here."""
        return list(argv) if self.local else self.ssh_argv() + [shlex.join(argv)]

    def run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT, input: str | None = None) -> subprocess.CompletedProcess:
        full = self.command(argv)
        try:
            return subprocess.run(full, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(full, 124, "", f"timed out after {timeout:.0f} s on machine {self.name}")
        except FileNotFoundError as e:
            return subprocess.CompletedProcess(full, 127, "", f"{e.filename} is not installed")

    def sh(self, script: str, timeout: float = COMMAND_TIMEOUT, input: str | None = None) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], timeout=timeout, input=input)

    def must(self, script: str, what: str, timeout: float = COMMAND_TIMEOUT, input: str | None = None) -> str:
        proc = self.sh(script, timeout=timeout, input=input)
        if proc.returncode != 0:
            raise TestbedError(f"machine {self.name}: {what}: {error_of(proc)}")
        return proc.stdout

    def runtime_for(self, base: Runtime, image: Path, tree: str) -> Runtime:
        """`base` (this machine's launch) as this machine's hosts see it: on another machine its
        copies of the image and of the guest tree (`tree`: the tree's content key) and its run
        directory."""
        if self.local:
            return base
        assert self.cache is not None
        return replace(base, repo=self.cache / tree_key(tree), state_dir=self.root,
                       image_dir=self.cache / image_key(image))

    def read_text(self, path: Path) -> str | None:
        if self.local:
            try:
                return path.read_text(errors="replace")
            except OSError:
                return None
        proc = self.run(["cat", str(path)])
        return proc.stdout if proc.returncode == 0 else None


def error_of(proc: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (proc.stderr or proc.stdout or "").splitlines() if l.strip()]
    return " / ".join(lines[-3:]) if lines else f"exit {proc.returncode}"


def places(topology: Topology, state_dir: Path) -> dict[str, Place]:
    """Machine name -> its Place, in the topology's order."""
    out = {}
    for m in topology.machines:
        if m.remote:
            base = Path(m.dir)
            out[m.name] = Place(machine=m, root=base / "run" / topology.name, cache=base / "cache")
        else:
            out[m.name] = Place(machine=m, root=state_dir)
    return out


def place_of(topology: Topology, all_places: dict[str, Place], host: str) -> Place:
    machine = topology.machine_of(host)
    assert machine is not None, f"host {host} is on no machine"
    return all_places[machine.name]


def unreachable(place: Place) -> str | None:
    """Why the launcher cannot work on this machine (None: it can)."""
    if place.local:
        return None
    proc = place.run(["true"], timeout=30)
    if proc.returncode != 0:
        return (f"machine {place.name} ({place.machine.ssh.destination}) does not answer over ssh "
                f"({error_of(proc)}); the launcher copies files and starts switches there over ssh, "
                "so 'ssh " + shlex.join(place.ssh_argv()[1:-1]) + " true' must work without a password")
    return None


# ---------------------------------------------------------------- copies by content
def guest_tree(repo: Path) -> tuple[list[str], str]:
    """The files guests see at /opt/snaptier on a machine without the checkout — the checkout's
    own files (tracked, and new ones not ignored) and the guest build's programs — and a key
    over their paths, modes and contents."""
    proc = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise TestbedError(f"cannot list the checkout's files for another machine: {proc.stderr.decode().strip()}")
    files = sorted({f for f in proc.stdout.decode().split("\0") if f and (repo / f).is_file()})
    build = repo / "build" / "guest"
    if not build.is_dir():
        raise TestbedError(f"{build} does not exist: build the agent for the guests first (make guest-agent)")
    for p in sorted(build.rglob("*")):
        rel = p.relative_to(repo)
        if p.is_file() and not set(TREE_SKIP_DIRS) & set(rel.parts) and not p.name.endswith(TREE_SKIP_SUFFIXES):
            files.append(str(rel))
    digest = hashlib.sha256()
    for rel in files:
        p = repo / rel
        digest.update(f"{rel}\0{p.stat().st_mode & 0o777:o}\0".encode())
        with open(p, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return files, digest.hexdigest()[:16]


def image_key(image: Path) -> str:
    """A guest image's name in a machine's cache: its local cache directory's, already keyed by
    what it was built from."""
    return image.name


def tree_key(digest: str) -> str:
    return f"tree-{digest}"


def push(place: Place, src: Path, files: list[str], dest: Path, timeout: float = COPY_TIMEOUT) -> None:
    """Copies `files` (relative to `src`) into `dest` on the machine, as one tar stream over ssh."""
    script = f"mkdir -p {shlex.quote(str(dest))} && tar -x -C {shlex.quote(str(dest))}"
    tar = subprocess.Popen(["tar", "-c", "--sparse", "-C", str(src), "--null", "-T", "-", "-f", "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    receiver = subprocess.Popen(place.command(["sh", "-c", script]), stdin=tar.stdout,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tar.stdout.close()   # the receiver's now: tar sees a broken pipe if the receiver dies
    try:
        tar.stdin.write(b"\0".join(f.encode() for f in files) + b"\0")
        tar.stdin.close()
    except BrokenPipeError:
        pass                # tar is gone: its exit status says why
    try:
        _, err = receiver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        receiver.kill()
        tar.kill()
        receiver.wait()
        tar.wait()
        raise TestbedError(f"machine {place.name}: copying {len(files)} files to {dest} did not finish "
                           f"within {timeout:.0f} s") from None
    tar_err = tar.stderr.read().decode(errors="replace").strip()
    tar_rc = tar.wait(timeout=60)
    if tar_rc != 0 or receiver.returncode != 0:
        why = err.decode(errors="replace").strip() or tar_err or f"exit {receiver.returncode}/{tar_rc}"
        raise TestbedError(f"machine {place.name}: copying {len(files)} files to {dest} failed: {why}")


def cached_copy(place: Place, src: Path, files: list[str], key: str, what: str, keep: int | None = None) -> Path:
    """`files` of `src` under the machine's cache as `key`, copied only if no complete copy is
    there (a copy is complete once its READY file exists; a half copy is replaced). With `keep`,
    a new copy removes all but the `keep` newest of the same kind (its key's prefix)."""
    assert place.cache is not None
    final = place.cache / key
    if place.sh(f"test -e {shlex.quote(str(final / READY))} && touch {shlex.quote(str(final))}").returncode == 0:
        return final
    size = sum((src / f).stat().st_blocks * 512 for f in files)
    say(f"machine {place.name}: copying {what} ({size / (1 << 20):.0f} MiB, {len(files)} files) to {final}")
    partial = place.cache / f".{key}.partial"
    place.must(f"rm -rf {shlex.quote(str(partial))}", f"clearing {partial}")
    push(place, src, files, partial)
    place.must(f"touch {shlex.quote(str(partial / READY))} && rm -rf {shlex.quote(str(final))} && "
               f"mv {shlex.quote(str(partial))} {shlex.quote(str(final))}", f"completing {final}")
    if keep:
        kind = key.split("-")[0]
        place.sh(f"cd {shlex.quote(str(place.cache))} && ls -1dt {shlex.quote(kind)}-* | tail -n +{keep + 1} | xargs -r rm -rf")
    return final


# ---------------------------------------------------------------- processes there
def free_ports(place: Place, count: int) -> list[int]:
    """`count` TCP ports free on the machine's loopback (the guests' forwarded ssh)."""
    if count == 0:
        return []
    if place.local:
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port())
        return sorted(ports)
    script = ("import socket; s=[socket.socket() for _ in range(%d)]; [x.bind(('127.0.0.1', 0)) for x in s]; "
              "print(' '.join(str(x.getsockname()[1]) for x in s))" % count)
    proc = place.run(["python3", "-c", script])
    if proc.returncode != 0:
        raise TestbedError(f"machine {place.name}: cannot pick free ports there (python3): {error_of(proc)}")
    return [int(p) for p in proc.stdout.split()]


def tag_pattern(tag: str) -> str:
    """An ERE matching exactly `process=TAG` in a command line (not a longer tag), and not the
    command line of a shell that carries the pattern itself."""
    return f"[p]rocess={tag}([, ]|$)"


def pid_of(place: Place, tag: str) -> int | None:
    """The live process carrying exactly process=TAG on the machine."""
    proc = place.run(["pgrep", "-f", "--", tag_pattern(tag)])
    pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
    return pids[0] if pids else None


def alive(place: Place, pids: dict[str, int], tags: dict[str, str]) -> set[str]:
    """Of the named processes (name -> pid on the machine), those alive and carrying exactly
    their tag: on another machine one round trip for the lot."""
    if not pids:
        return set()
    if place.local:
        found = set()
        for name, pid in pids.items():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if re.search(tag_pattern(tags[name]), cmdline):
                found.add(name)
        return found
    script = "; ".join(f"tr '\\0' ' ' < /proc/{pid}/cmdline 2>/dev/null | grep -qE -- {shlex.quote(tag_pattern(tags[n]))} "
                       f"&& echo {shlex.quote(n)}" for n, pid in pids.items())
    proc = place.sh(script + "; true", timeout=30)
    return set(proc.stdout.split()) & set(pids)
