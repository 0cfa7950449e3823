"""Hostile agents: each misbehaves one way an untrusted agent could, to prove the supervisor contains it.

Every class is a demo agent (so ordinary chat still works) plus one weapon, fired by a command or
by its session id, so one supervisor can run a hostile session beside well-behaved ones.
"""

import gc
import os
import re
import signal
import socket
import struct
import sys
import time

from corral.agent_proc import protocol as p
from corral.agent_proc import zmtp
from corral.agent_proc.demo import DemoAgent


def _caller(type_name: str):
    """The ``self`` of the nearest calling frame whose object is a ``type_name`` (the agent's own loop)."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if type(obj).__name__ == type_name:
            return obj
        frame = frame.f_back
    raise RuntimeError(f"no {type_name} up the stack")


def _current_req() -> int:
    """The request id of the turn being handled (a local of the agent loop's ``handle``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "handle" and "req" in frame.f_locals:
            return frame.f_locals["req"]
        frame = frame.f_back
    raise RuntimeError("not inside a turn")


def _own_dealer():
    """The agent's own DEALER socket (what a hostile agent can always reach: it is its memory)."""
    return _caller("AgentLoop").sock


class Flooder(DemoAgent):
    """Abuses its own connection to the hub (the only one it has): frames for turns it was never
    given, floods of empty frames, PINGs it never reads the PONGs of, oversize PING context."""

    def cmd_flood(self, args):
        """Send ``frames`` CHUNK frames for turns that do not exist."""
        frames = int(args.get("frames", 100_000))
        sock = _own_dealer()
        payload = "x" * int(args.get("bytes", 64))
        for i in range(frames):
            sock.send(p.pack_chunk(10**9 + i, payload))
        return {"sent": frames}

    def cmd_raw_flood(self, args):
        """Write ``frames`` copies of one raw ZMTP frame, never reading: ``kind`` is empty, chunk (an
        empty CHUNK of this very turn: nothing stray about it), ping or big_ping."""
        kind = args.get("kind", "empty")
        one = {
            "empty": zmtp.frame(b""),
            "chunk": zmtp.frame(p.pack_chunk(_current_req(), "")),
            "ping": zmtp.command(b"PING", b"\x00\x10" + b"c" * 16),  # the most context the spec allows
            "big_ping": zmtp.command(b"PING", b"\x00\x10" + b"c" * 65_536),
        }[kind]
        batch = one * max(1, (1 << 20) // len(one))
        sock = _own_dealer().sock
        sent = 0
        while sent < int(args["frames"]):
            sock.sendall(batch)
            sent += len(batch) // len(one)
        return {"sent": sent}

    def cmd_spoof(self, args):
        """Answer request ids ``low`` to ``high`` (another session's turns) on our own connection."""
        sock = _own_dealer()
        for req in range(int(args["low"]), int(args["high"])):
            sock.send(p.pack_done(req, f"spoofed by {self.session_id}", {}))
        return {"sent": int(args["high"]) - int(args["low"])}

    def cmd_find_doors(self, args):
        """Try every way in a local process has: the old socket path, and every listening Unix socket."""
        opened = []
        for path in [args["old_socket"], *_listening_unix_paths()]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    continue
                opened.append(path)
        return {"opened": opened}


def _listening_unix_paths() -> list[str]:
    """Paths (and @abstract names) of every listening Unix stream socket on the host."""
    paths = []
    try:
        f = open("/proc/net/unix")
    except OSError:
        return paths  # the sandbox hides it: then only the old path is tried
    with f:
        next(f)
        for line in f:
            cols = line.split()
            if len(cols) >= 8 and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON: it listens
                paths.append(cols[7].replace("@", "\0", 1) if cols[7].startswith("@") else cols[7])
    return paths


class Unresponsive(DemoAgent):
    """``hang``: ignores SIGINT and SIGTERM and never answers; only SIGKILL ends it."""

    def on_message(self, text):
        """Hang on ``hang``; else the demo reply."""
        if text == "hang":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _sleep_forever()
        return super().on_message(text)


class Forker(DemoAgent):
    """``fork``: leaves children behind: one in its process group, one that escapes it with setsid."""

    def cmd_fork(self, args):
        """Fork ``n`` sleepers (the last one calls setsid) and a grandchild; return every pid."""
        n = int(args.get("n", 2))
        pids = []
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                if i == n - 1 and args.get("escape", True):
                    os.setsid()  # out of the agent's process group: only a cgroup can still find it
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(w)
                    _sleep_forever()
                os.write(w, f"{grandchild}\n".encode())
                os.close(w)
                _sleep_forever()
            os.close(w)
            with os.fdopen(r) as f:
                pids += [pid, int(f.readline())]
        return {"pids": pids}


class StubbornAgent(DemoAgent):
    """Ignores SIGTERM and hangs on shutdown: only SIGKILL at stop_timeout ends it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def on_stop(self):
        """Never return."""
        _sleep_forever()


class StormAgent(DemoAgent):
    """Dies on every start when its session id starts with ``storm``; the others are demo agents."""

    def on_start(self, history):
        """Exit at once for storm sessions."""
        if self.session_id.startswith("storm"):
            os._exit(7)
        super().on_start(history)


class SlowAgent(DemoAgent):
    """``slow <seconds> <socket path>``: signals the test that the turn began, then takes its time."""

    def on_message(self, text):
        """Sleep for slow messages (after a datagram to the test's socket); else the demo reply."""
        if text.startswith("slow "):
            _, seconds, path = text.split(" ", 2)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(self.session_id.encode(), path)
            time.sleep(float(seconds))
            return f"slept {seconds} in {self.session_id}"
        return super().on_message(text)


CLONE_NEWUSER = 0x10000000
CLONE_NR = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine, -1)


IO_URING_SETUP = 425  # the same number on x86_64 and aarch64
EXECVEAT_NR = {"x86_64": 322, "aarch64": 281}.get(os.uname().machine, -1)


def spawn(path: str, *, fd: int | None = None) -> str:
    """Fork and exec ``path`` (or the file open on ``fd``, by execveat); raise the exec's OSError."""
    import ctypes

    read_end, write_end = os.pipe()  # close-on-exec: a successful exec closes it
    pid = os.fork()
    if pid == 0:
        err = 0
        try:
            if fd is None:
                os.execv(path, [path])
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(EXECVEAT_NR, fd, b"", None, None, 0x1000)  # AT_EMPTY_PATH
            err = ctypes.get_errno()
        except OSError as exc:
            err = exc.errno
        os.write(write_end, str(err).encode())
        os._exit(127)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    if err:
        raise OSError(int(err), os.strerror(int(err)))
    return f"ran {path}: exit {os.waitstatus_to_exitcode(status)}"


def _sleep_forever():
    """Block until killed."""
    while True:
        time.sleep(3600)


class Escaper(DemoAgent):
    """``attack``: tries one way out of its sandbox; answers {"escaped": bool, "detail": ...}.

    Every attack is what an agent taken over by a prompt injection would try. The test asserts
    each fails (``escaped`` False) and that ``tmp`` (its own temp dir) works, so the denials are real.
    """

    def cmd_attack(self, args):
        """Run the attack named ``args["what"]``."""
        what = args["what"]
        try:
            detail = getattr(self, "_" + what)(args)
        except (OSError, ValueError) as exc:  # setrlimit says EPERM as ValueError
            return {"escaped": False, "detail": f"{type(exc).__name__}: {exc}"}
        return {"escaped": True, "detail": detail}

    def _read(self, args):
        """Read a file (a data dir, the tenants file, /proc/1/environ ...)."""
        with open(args["path"], "rb") as f:
            return f.read(64).decode("latin-1")

    def _list(self, args):
        """List a directory."""
        return os.listdir(args["path"])

    def _write(self, args):
        """Create a file."""
        with open(args["path"], "w") as f:
            f.write("owned")
        return args["path"]

    def _symlink(self, args):
        """Plant a symlink pointing anywhere (in its own temp dir this works: the sweep must not follow it)."""
        os.symlink(args["target"], args["path"])
        return args["path"]

    def _tmp(self, args):
        """Write and read back a file in TMPDIR (must work: the control)."""
        import tempfile

        with tempfile.NamedTemporaryFile(dir=os.environ["TMPDIR"]) as f:
            f.write(b"mine")
            f.flush()
            return {"tmpdir": os.environ["TMPDIR"], "gettempdir": tempfile.gettempdir(), "name": f.name}

    def _proc_fds(self, args):
        """Open the supervisor's database through /proc/<pid>/fd."""
        fd_dir = f"/proc/{args['pid']}/fd"
        for name in os.listdir(fd_dir):
            target = os.readlink(os.path.join(fd_dir, name))
            if target.endswith(".sqlite3"):
                with open(os.path.join(fd_dir, name), "rb") as f:
                    return f.read(16).decode("latin-1")
        return "listed the fds, found no database"

    def _rlimit(self, args):
        """Raise the open-files hard limit back up."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
        return resource.getrlimit(resource.RLIMIT_NOFILE)

    def _kill(self, args):
        """SIGKILL a process outside the session."""
        os.kill(int(args["pid"]), signal.SIGKILL)
        return f"killed {args['pid']}"

    def _ptrace(self, args):
        """PTRACE_ATTACH a process outside the session (the zygote)."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, int(args["pid"]), None, None) != 0:  # PTRACE_ATTACH
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return f"attached to {args['pid']}"

    def _syscall(self, args):
        """Call a raw syscall the agent never needs (mount, keyctl, bpf, unshare ...)."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(int(args["nr"]), *[ctypes.c_long(a) for a in args.get("args", [])]) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return f"syscall {args['nr']} succeeded"

    def _connect_unix(self, args):
        """Connect to a corral socket (the hub's)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(args["path"])
        return f"connected to {args['path']}"

    def _tcp(self, args):
        """Connect out over TCP."""
        with socket.create_connection(("127.0.0.1", int(args["port"])), timeout=5):
            return "connected"

    def _udp(self, args):
        """Open a UDP socket."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("127.0.0.1", int(args["port"])))
        return "sent"

    def _socket(self, args):
        """Make a socket of any family (netlink, vsock, packet ...): the kernel's other ends."""
        with socket.socket(int(args["family"]), int(args.get("type", socket.SOCK_DGRAM)), int(args.get("proto", 0))):
            return f"made a socket of family {args['family']}"

    def _io_uring(self, args):
        """io_uring_setup: a ring whose operations (IORING_OP_SOCKET, ...) no seccomp filter sees."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
        fd = libc.syscall(IO_URING_SETUP, 1, params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.close(fd)
        return "made an io_uring"

    def _run(self, args):
        """Run a program (``/bin/true`` must run: the control)."""
        return spawn(args["path"])

    def _run_copy(self, args):
        """Copy a binary into TMPDIR and run it from there."""
        copy = os.path.join(os.environ["TMPDIR"], "mine")
        with open(args["path"], "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
        os.chmod(copy, 0o755)
        return spawn(copy)

    def _run_memfd(self, args):
        """Copy a binary into a memfd and run it: by /proc/self/fd, then by execveat(AT_EMPTY_PATH)."""
        fd = os.memfd_create("mine", int(args.get("flags", 0)))
        with open(args["path"], "rb") as src:
            os.write(fd, src.read())
        refused = []
        for how in ("proc", "execveat"):
            try:
                return spawn(f"/proc/self/fd/{fd}", fd=fd if how == "execveat" else None)
            except OSError as exc:
                refused.append(f"{how}: {exc}")
        raise OSError(f"refused: {'; '.join(refused)}")

    def _fill(self, args):
        """Write ``most`` bytes into TMPDIR (in 64 KiB writes); an OSError says how far it got."""
        written, chunk = 0, b"x" * 65536
        with open(os.path.join(os.environ["TMPDIR"], "fill"), "wb", buffering=0) as f:
            while written < int(args["most"]):
                try:
                    written += f.write(chunk)
                except OSError as exc:
                    raise OSError(exc.errno, f"{exc.strerror} after {written} bytes") from None
        return {"bytes": written}

    def _files(self, args):
        """Make ``most`` empty files in TMPDIR; an OSError says how many it made."""
        for made in range(int(args["most"])):
            try:
                os.close(os.open(os.path.join(os.environ["TMPDIR"], f"e{made}"), os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} after {made} files") from None
        return {"files": int(args["most"])}

    def _deep_tree(self, args):
        """Leave a tree that wedges a recursive remover: a ``depth``-deep chain in TMPDIR, symlink loops,
        files, and directories it made unreadable and unwritable (mode 000)."""
        top = os.open(os.environ["TMPDIR"], os.O_RDONLY | os.O_DIRECTORY)
        depth = int(args.get("depth", 3000))
        os.mkdir("chain", dir_fd=top)
        # Built from the bottom up, by renames at the top: each step is shallow (Landlock checks a path's
        # whole way up, so making it top down would cost depth squared).
        for level in range(depth - 1):
            os.mkdir("up", dir_fd=top)
            if level % 500 == 0:
                os.symlink("..", "up/loop", dir_fd=top)
                os.close(os.open("up/f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=top))
            os.rename("chain", "up/d", src_dir_fd=top, dst_dir_fd=top)
            os.rename("up", "chain", src_dir_fd=top, dst_dir_fd=top)
        os.mkdir("closed", dir_fd=top)
        os.mkdir("closed/inner", dir_fd=top)
        os.chmod("closed/inner", 0, dir_fd=top)
        os.chmod("closed", 0, dir_fd=top)
        os.close(top)
        return {"depth": depth}

    def _fork_bomb(self, args):
        """Fork sleepers until fork fails; return how many were made (they live until the session ends)."""
        made = 0
        for _ in range(int(args.get("most", 1000))):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3600)
                os._exit(0)
            made += 1
        return {"forked": made}

    def _new_user_namespace(self, args):
        """Make a user namespace of its own (full capabilities in it): by unshare, then by clone."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) == 0:
            return "unshare(CLONE_NEWUSER) succeeded"
        refused = [f"unshare: {os.strerror(ctypes.get_errno())}"]
        pid = libc.syscall(CLONE_NR, ctypes.c_ulong(CLONE_NEWUSER | signal.SIGCHLD), None, None, None, None)
        if pid == 0:
            os._exit(0)
        if pid > 0:
            os.waitpid(pid, 0)
            return "clone(CLONE_NEWUSER) succeeded"
        refused.append(f"clone: {os.strerror(ctypes.get_errno())}")
        raise OSError(ctypes.get_errno(), "; ".join(refused))

    def cmd_privileges(self, args):
        """What this process holds: its ids, every capability set (by capget and prctl), no_new_privs, seccomp."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
        data = ctypes.create_string_buffer(24)
        if libc.capget(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        words = struct.unpack("=6I", data.raw)  # (effective, permitted, inheritable) for caps 0-31, then 32-63
        last = max(cap for cap in range(64) if libc.prctl(23, cap, 0, 0, 0) >= 0)  # PR_CAPBSET_READ: EINVAL past the last
        return {
            "ids": [list(os.getresuid()), list(os.getresgid()), os.getgroups()],
            "effective": words[0] | words[3] << 32, "permitted": words[1] | words[4] << 32,
            "inheritable": words[2] | words[5] << 32,
            "bounding": [cap for cap in range(last + 1) if libc.prctl(23, cap, 0, 0, 0) == 1],
            "ambient": [cap for cap in range(last + 1) if libc.prctl(47, 1, cap, 0, 0) == 1],  # PR_CAP_AMBIENT_IS_SET
            "no_new_privs": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0),
        }

    def _escape_tree(self, args):
        """setsid + double fork: a grandchild that no longer belongs to the agent's process group."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(write_end, b"x")
                time.sleep(3600)
            os._exit(0)
        os.waitpid(pid, 0)
        os.read(read_end, 1)  # the grandchild is running
        return {"escaped_to_new_session": True}


# Every secret a test gives the server starts with this, followed by hex (tests/test_secrets.py); the
# hunter looks for SECRET_MARK + hex anywhere it can reach, so its own code (this constant) never matches.
SECRET_MARK = "hunted-"
_SECRET = re.compile(re.escape(SECRET_MARK) + "[0-9a-f]{8}")


class SecretHunter(DemoAgent):
    """``hunt``: searches everything of its own for the server's secrets; answers where it found any.

    Its environment, ``/proc/self/environ`` and ``cmdline``, ``sys.argv``, every string and bytes held
    by a container ``gc`` tracks, the locals of its stack, and (where ``/proc/self/mem`` is readable)
    the raw bytes of its whole address space, freed memory included.
    """

    def cmd_hunt(self, args):
        """Where secrets were found ({place: [matches]}), what could not be searched, and the environment."""
        found, unreadable = {}, []
        for place, text in self._texts():
            hits = _SECRET.findall(text)
            if hits:
                found.setdefault(place, []).extend(sorted(set(hits)))
        try:
            raw = _scan_memory(_SECRET.pattern.encode())
            if raw:
                found["memory"] = sorted(raw)
        except OSError as exc:
            unreadable.append(f"memory: {exc}")
        return {"found": found, "unreadable": unreadable, "environ": dict(os.environ)}

    def _texts(self):
        """(place, text) for every string the agent can reach without reading raw memory."""
        yield "os.environ", repr(dict(os.environ))
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/self/{name}", "rb") as f:
                    yield f"/proc/self/{name}", f.read().decode("latin-1")
            except OSError:
                pass
        yield "sys.argv", repr(sys.argv) + repr(getattr(sys, "orig_argv", ()))
        frame = sys._getframe()
        while frame is not None:
            yield f"stack:{frame.f_code.co_name}", "".join(_strings(frame.f_locals.values()))
            frame = frame.f_back
        for obj in gc.get_objects():
            if isinstance(obj, dict):
                text = "".join(_strings(obj.keys())) + "".join(_strings(obj.values()))
            elif isinstance(obj, (list, tuple, set, frozenset)):
                text = "".join(_strings(obj))
            else:
                text = "".join(_strings(getattr(obj, "__dict__", {}).values())) if hasattr(obj, "__dict__") else ""
            if SECRET_MARK in text:
                yield f"gc:{type(obj).__name__}", text


def _strings(items):
    """The str and bytes among ``items``, as text."""
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, (bytes, bytearray)):
            yield bytes(item).decode("latin-1")


def _scan_memory(pattern: bytes) -> set[str]:
    """Every match of ``pattern`` in the readable mappings of this process (OSError if /proc/self is closed)."""
    found = set()
    regex = re.compile(pattern)
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps.read().splitlines():
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                data = os.pread(mem.fileno(), end - start, start)
            except OSError:
                continue
            found.update(m.decode("latin-1") for m in regex.findall(data))
            del data
    return found


class SnapshotHog(DemoAgent):
    """``bloat``: its ``snapshot()`` carries ``mib`` MiB from then on (0 empties it)."""

    ballast = ""

    def cmd_bloat(self, args):
        """Make the state snapshot ``mib`` MiB big."""
        self.ballast = "x" * int(float(args.get("mib", 15)) * 1024 * 1024)
        return {"bytes": len(self.ballast)}

    def snapshot(self):
        """The demo's state and the ballast."""
        return {**super().snapshot(), "ballast": self.ballast}
