"""The zygote: imports the agent code once, then forks one warm child per session.

It runs in its own process (a fresh interpreter the supervisor starts with a clean environment,
``boot``), talks to the supervisor over a pipe in the typed records of ``zygote_messages``, and
reports every child's pid and exit status (by the request's spawn id, so an exit is never read
before the supervisor can tell whose it is; the supervisor holds no descriptor per child for its
exit). Each spawn request comes with the child's connection to the hub (one end of a socket pair),
passed over a second socket with SCM_RIGHTS, so the child is connected from birth and the hub needs
no listening socket. The child's output pipe (stdout and stderr both) is made here and its read end
handed to the output relay, a process forked here at the start (``output_relay.py``), with the
child's ``Spawned`` record: the relay sends what agents write to the supervisor as ``Output``
records, and every ``Spawned`` and ``Exited`` goes through it, so the server holds one descriptor per
session, not two. Forking from here costs milliseconds where a fresh interpreter costs tens of
them, and children share its pages.
"""

import _signal
import gc
import os
import resource
import selectors
import signal
import socket
import sys
import traceback

from corral.agent_proc import disk, environment, forking, immortal, netns, sandbox, startup_checks, userns, warmup
from corral.agent_proc import output_relay
from corral.agent_proc.zygote_messages import Exited, Failed, Quit, Ready, Spawn, Spawned, SpawnFailed, Start, recv, send
from corral.agent_proc.limits import apply_limits
from corral.agent_proc.process import agent_title, arm_death_signal, die_with_parent, load_agent_class, set_title
from corral.agent_proc.sources import keep_sources
from corral.agent_proc.stdio import agent_streams, attach_stdio

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # a terminal's Ctrl-C and a group-wide stop: the supervisor's to act on


def boot() -> None:
    """The zygote's first code (``python -c``; supervisor/spawner.py): read its start message, then run.

    ``sys.argv`` holds only the numbers of its three descriptors: the pipe to the supervisor, the
    socket the hub connections come over and the output relay's pipe to the supervisor. The ``Start``
    record (agent, supervisor pid, sandbox options, the supervisor's ``sys.path``, so agent modules
    import as they would there) comes on the pipe: no secret of the server's is on our command line,
    in our environment or our memory.
    """
    from multiprocess.connection import Connection

    conn = Connection(int(sys.argv[1]))
    fd_channel = socket.socket(fileno=int(sys.argv[2]))
    relay_conn = Connection(int(sys.argv[3]))
    try:
        start = recv(conn)
    except (EOFError, OSError):
        return  # the supervisor went away before it said what to run (a stop signal during its start-up)
    if not isinstance(start, Start):
        raise SystemExit(f"corral zygote: expected a start message, got {type(start).__name__}")
    sys.path[:] = start.sys_path
    zygote_main(conn, fd_channel, relay_conn, start.agent, start.supervisor_pid, start.options)


def zygote_main(conn, fd_channel: socket.socket, relay_conn, agent_spec: str, supervisor_pid: int,
                options: dict | None = None) -> None:
    """Entry point of the zygote process; ``options`` from ``supervisor.sandbox_plan.Sandbox.zygote_options``."""
    set_title(f"corral: zygote agent={agent_spec}")
    die_with_parent(supervisor_pid)
    # Ctrl-C and a group-wide SIGTERM reach us too; the supervisor decides when we go (and if it
    # dies, the death signal takes us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held by the supervisor until now (spawner.py)
    try:
        _start_and_serve(conn, fd_channel, relay_conn, agent_spec, options or {})
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return  # the supervisor went away (a stop signal during its start-up): nobody to report to


def _start_and_serve(conn, fd_channel: socket.socket, relay_conn, agent_spec: str, options: dict) -> None:
    """Set up the sandbox's process tree, import the agent, report ready, then serve spawn requests."""
    try:
        if options.get("user_namespace") and (options.get("pid_namespace") or options.get("net_namespace")):
            # Before the agent's imports: one may start a thread, and the kernel refuses a new user
            # namespace to a process with more than one.
            userns.enter_user_namespace()
        _enter_mount_namespace(options)  # before the imports too: unshare(CLONE_NEWNS) wants one thread
    except OSError as exc:
        send(conn, Failed(f"cannot set up the sandbox: {exc}"))
        return
    forking.record_hooks()  # the agent's imports may register at-fork hooks: each agent runs them
    agent_cls = load_checked_agent(conn, agent_spec, options)
    if agent_cls is None:
        return
    try:
        # After them: once it has unshared a pid namespace, a process may start no thread, and an
        # agent's import may start one. The network namespace before it: that drops our capabilities.
        if options.get("net_namespace"):
            _enter_network_namespace(fd_channel)
        # Before the agents' pid namespace: outside it, no agent sees it; nothing made after it is its.
        relay = output_relay.start(relay_conn, close=(conn.fileno(), fd_channel.fileno()))
        ns_init = _set_up_process_tree(conn, options)
        prebuilt = sandbox.prebuild(options)
    except OSError as exc:
        send(conn, Failed(f"cannot set up the sandbox: {exc}"))
        return
    warmup.rehearse(tmpdir=prebuilt and prebuilt.tmp_parent)  # before the freeze: what it leaves is shared, not copied into each agent
    heap = _share_heap(options.get("immortal_heap", "auto"))  # last before the freeze: get_objects skips frozen ones
    gc.freeze()  # keep the imported objects out of GC passes so children don't copy their pages
    Zygote(conn, fd_channel, relay, agent_cls, ns_init=ns_init, prebuilt=prebuilt, heap=heap).serve()


def _share_heap(choice: str) -> str:
    """Make the objects held now immortal unless told not to or the interpreter cannot; what was done, in words."""
    if choice == "off":
        return "counted (--immortal-heap off)"
    why_not = immortal.unavailable()
    if why_not:
        return f"counted ({why_not})"
    marked = immortal.make_heap_immortal()
    filled = immortal.fill_free_blocks()  # after: the walk's own bookkeeping left free blocks too
    return f"immortal ({marked} objects, {filled} free blocks filled)"


def _enter_mount_namespace(options: dict) -> None:
    """A mount namespace of our own, for the size-limited tmpfs on each agent's TMPDIR (the disk layer)."""
    if options.get("mount_namespace"):
        disk.enter_mount_namespace()


def _enter_network_namespace(fd_channel: socket.socket) -> None:
    """Move into the agents' network namespace and send the supervisor the gateway's listener made in it.

    Sent before "ready", so the supervisor finds it queued when it reads that.
    """
    netns.enter_network_namespace()
    netns.reserve_proxy_variables()
    listener = netns.gateway_listener()
    try:
        socket.send_fds(fd_channel, [b"g"], [listener.fileno()])
    finally:
        listener.close()  # the supervisor's now: no agent inherits it

def load_checked_agent(conn, agent_spec: str, options: dict):
    """Import and check the agent class and its configuration, keep its source lines; None once a failure is reported."""
    before = set(sys.modules)
    try:
        agent_cls = load_agent_class(agent_spec)
        startup_checks.check_agent(agent_cls, agent_spec, startup_checks.SandboxInfo(own_uid=bool(options.get("own_uid"))))
        import corral.agent_proc.main  # noqa: F401  pre-import what every child needs
        preload_stdlib()
    except (Exception, SystemExit) as exc:
        send(conn, Failed(startup_checks.describe_failure(agent_spec, exc)))
        return None
    keep_sources(set(sys.modules) - before, agent_cls)
    return agent_cls


def _set_up_process_tree(conn, options: dict) -> int | None:
    """Become the subreaper and enter the agents' namespaces, as the options say; the namespace init's pid."""
    if options.get("subreaper"):
        sandbox.set_subreaper()  # an agent's orphans come to us, not to init
    if not options.get("pid_namespace"):
        return None
    keep = 1 << sandbox.CAP_SYS_ADMIN if options.get("mount_namespace") else 0  # to mount each agent's tmpfs
    return _enter_pid_namespace(conn, in_user_namespace=bool(options.get("user_namespace")), keep=keep)


def _enter_pid_namespace(conn, *, in_user_namespace: bool = False, keep: int = 0) -> int:
    """Put every agent forked from now on in one new pid namespace, whose init we fork now.

    When that init dies (with us, by its death signal), the kernel kills every process in the
    namespace: agents, and whatever they setsid'ed or double-forked, even if the server was SIGKILLed.
    ``in_user_namespace`` (a server that is not root, whose zygote entered a user namespace of its
    own to be allowed this): every capability that gave us is dropped before anything is forked but
    ``keep`` (a mask), which the init and every agent clear themselves.
    """
    sandbox.unshare_pid_namespace()
    if in_user_namespace:
        userns.drop_every_capability(keep=keep)
    zygote_fd = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        _ns_init(conn, zygote_fd)  # never returns
    os.close(zygote_fd)
    return pid


def _ns_init(conn, zygote_fd: int) -> None:
    """Pid 1 of the agents' namespace: reap orphans until the zygote dies, then take everyone along."""
    try:
        set_title("corral: init of the agents' pid namespace")
        sandbox.set_capabilities(0)  # it only reaps: nothing the zygote kept is its
        arm_death_signal()
        if sandbox.parent_gone(zygote_fd):
            os._exit(0)
        conn.close()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        while True:
            signal.sigwait({signal.SIGCHLD})
            _reap_all()
    finally:
        os._exit(0)


def _reap_all() -> None:
    """Collect every exited child without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# Stdlib modules Python imports lazily, on first use, that agents commonly reach. A sandboxed agent
# may not be able to read the installation (a dropped uid and Python under root's 0700 home), so
# the zygote imports them once for every child; the pages are shared (docs/security.md). Clients
# read the egress gateway's proxy variables with urllib.request, and aiohttp with trust_env reads
# ~/.netrc on an executor's thread; httpx (the openai SDK's) finds its CAs with importlib.resources.
PRELOAD = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_16", "encodings.utf_32",
           "encodings.raw_unicode_escape", "encodings.unicode_escape", "stringprep", "unicodedata",
           "tempfile", "json", "linecache", "tokenize", "traceback", "socket", "selectors", "ssl", "hashlib",
           "urllib.request", "netrc", "concurrent.futures.thread", "importlib.resources", "importlib.readers")


def preload_stdlib() -> None:
    """Import PRELOAD; a module this Python lacks (no ssl built) is skipped."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


class Zygote:
    """Forks children on request and reports their deaths."""

    def __init__(self, conn, fd_channel: socket.socket, relay: tuple[int, socket.socket], agent_cls, *,
                 ns_init: int | None = None, prebuilt=None, heap: str = "counted"):
        self.conn = conn
        self.heap = heap  # whether the objects every child shares are immortal (agent_proc/immortal.py), in words
        self.prebuilt = prebuilt  # sandbox.Prebuilt: the layers' rules and filters, built once for every child
        # the supervisor sends each child's hub connection here, before its request
        self.fd_channel = fd_channel
        self.ns_init = ns_init  # pid 1 of the agents' pid namespace, if there is one
        self.pidfd = os.pidfd_open(os.getpid())  # lets a child check we are alive (its getppid is 0 in a pid namespace)
        self.uids: dict[int, int] = {}  # child pid -> its sandbox uid
        self.mounts: dict[int, str] = {}  # child pid -> the tmpfs on its TMPDIR, unmounted once it has exited
        self.agent_cls = agent_cls
        self.forker = forking.Forker()  # after every import: it checks the zygote has one thread
        self.streams = agent_streams()  # every child's sys.stdout/stderr, unused here (see agent_streams)
        self.children: dict[int, int] = {}  # child pid -> the spawn id its exit is reported under
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()
        # What a child closes of ours, by number: closing the objects would run (and copy the pages
        # of) selectors', multiprocess's and socket's teardown code in every agent. The child never
        # returns to them, and leaves by os._exit, so no finalizer closes a number twice.
        # The output relay (its pid, our socket to it): every child's output pipe is read there, and
        # its Spawned and Exited go through it. An agent must not speak for the zygote: it closes it too.
        self.relay_pid, self.relay = relay
        self.own_fds = (self.pidfd, self.wake_r, self.wake_w, self.selector.fileno(), conn.fileno(),
                        fd_channel.fileno(), self.relay.fileno())

    def serve(self) -> None:
        """Wait for spawn requests and SIGCHLD; return when the supervisor says quit or goes away."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
        self.selector.register(self.conn.fileno(), selectors.EVENT_READ, "conn")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        send(self.conn, Ready(os.getpid(), self.forker.describe(), self.heap))
        while True:
            for key, _ in self.selector.select():
                if key.data == "signal":
                    self._drain_wakeups()
                    if not self.reap():
                        return
                elif not self.handle_request():
                    return

    def _drain_wakeups(self) -> None:
        """Empty the signal wakeup pipe."""
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def handle_request(self) -> bool:
        """Serve one request from the supervisor; False means stop."""
        try:
            msg = recv(self.conn)
        except (EOFError, OSError, ValueError):
            return False  # the supervisor is gone (or speaks another version); our children's death signal takes them too
        if isinstance(msg, Spawn):
            self.spawn(msg)
            return True
        return not isinstance(msg, Quit)

    def spawn(self, req: Spawn) -> None:
        """Fork one agent process with its hub connection (and output pipe) and report its pid."""
        try:
            conn_fd = self._recv_connection()
        except OSError as exc:
            send(self.conn, SpawnFailed(req.spawn_id, f"no hub connection: {exc}", exc.errno))
            return
        pid = bounded = read_fd = write_fd = None
        try:
            if req.output:
                read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            bounded = _bound_disk(req.sandbox or {})
            pid = self.forker.fork()
        except OSError as exc:
            what = ("no output pipe" if req.output and write_fd is None else
                    "fork failed" if bounded or not (req.sandbox or {}).get("disk") else "no bounded TMPDIR")
            send(self.conn, SpawnFailed(req.spawn_id, f"{what}: {exc}", exc.errno))
            _unbound_disk(bounded)
        if pid == 0:
            self._become_agent(req, conn_fd, read_fd, write_fd)  # never returns
        for fd in (conn_fd, write_fd):
            if fd is not None:
                os.close(fd)  # the child's now: the hub sees EOF when the child's side closes
        if pid is None:
            if read_fd is not None:
                os.close(read_fd)
            return
        if bounded:
            self.mounts[pid] = bounded
        self.children[pid] = req.spawn_id
        uid = (req.sandbox or {}).get("uid")
        if uid is not None:
            self.uids[pid] = uid
        try:
            output_relay.report(self.relay, Spawned(req.spawn_id, pid), read_fd)  # the relay reads the pipe from now on
        finally:
            if read_fd is not None:
                os.close(read_fd)

    def reap(self) -> bool:
        """Collect every exited child, kill what it left behind, report its status; False if pid 1 of the agents died."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is None:
                return True
            pid = info.si_pid
            if pid not in self.children:
                os.waitpid(pid, 0)  # an orphan adopted as subreaper, the namespace's init or the output relay
                if pid in (self.ns_init, self.relay_pid):
                    return False  # no agent can be forked (or reported) any more: let the supervisor start a new zygote
                continue
            # The zombie still holds its pid, so the group id cannot have been reused yet:
            # whatever the agent forked dies with it, and nobody else is hit.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            uid = self.uids.pop(pid, None)
            if uid is not None:
                _kill_uid(uid)  # setsid'ed and double-forked leftovers too, before the uid is handed out again
            _, status, rusage = os.wait4(pid, 0)  # its CPU (and its reaped children's) for usage accounting
            _unbound_disk(self.mounts.pop(pid, None))  # before the report: the supervisor then removes the dir
            # through the relay, which sends what its pipe still holds (a crash's traceback) first
            output_relay.report(self.relay, Exited(self.children.pop(pid), status, rusage.ru_utime + rusage.ru_stime))

    def _recv_connection(self) -> int:
        """The child's hub connection, sent just before its request (close-on-exec: a program the agent runs has none)."""
        _, fds, _, _ = socket.recv_fds(self.fd_channel, 1, 1, socket.MSG_CMSG_CLOEXEC)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"expected 1 descriptor, got {len(fds)}")
        return fds[0]

    def _become_agent(self, req: Spawn, conn_fd: int, read_fd: int | None, output_fd: int | None) -> None:
        """In the forked child: isolate, limit, and run the agent; always exits."""
        code = 1
        try:
            if output_fd is not None:
                attach_stdio(output_fd, self.streams)  # first, so everything after it is captured
            os.setpgid(0, 0)  # own process group, so a stop or interrupt reaches the agent's children too
            arm_death_signal()
            if sandbox.parent_gone(self.pidfd):
                os._exit(1)
            for fd in self.own_fds:
                os.close(fd)
            if read_fd is not None:
                os.close(read_fd)  # the relay's; the zygote holds no other agent's
            signal.set_wakeup_fd(-1)
            # _signal's: signal.signal would map the old handler (our lambda) to an enum member,
            # failing through enum's lookup and exception code, copied into every agent.
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash test must not litter cores
            apply_limits(req.limits)
            environment.enter(req.env, (req.sandbox or {}).get("tmpdir"))
            set_title(agent_title(req.session_id, req.tenant, False))
            from corral.agent_proc.main import run_agent

            code = run_agent(
                self.agent_cls,
                session_id=req.session_id,
                routing_id=req.routing_id or req.session_id.encode(),
                tenant=req.tenant,
                conn=socket.socket(fileno=conn_fd),
                confine=lambda: sandbox.confine(req.sandbox, self.prebuilt),
            )
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _bound_disk(spec: dict) -> str | None:
    """Mount the size-limited tmpfs on a session's TMPDIR (the disk layer), before its agent is forked; its path."""
    if not spec.get("disk"):
        return None
    uid = spec["uid"] if spec.get("uid") is not None else os.geteuid()
    gid = spec["gid"] if spec.get("gid") is not None else os.getegid()
    disk.mount_tmpfs(spec["tmpdir"], size=int(spec["disk"]), uid=uid, gid=gid)
    return spec["tmpdir"]


def _unbound_disk(path: str | None) -> None:
    """Detach an exited agent's tmpfs: everything it wrote goes with it."""
    if path is not None:
        try:
            disk.unmount(path)
        except OSError:
            pass  # already gone; the namespace takes whatever is left when the zygote exits


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a sandbox uid (what an agent left behind): kill(-1) from a child that becomes it."""
    try:
        pid = os.fork()
    except OSError:
        return
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # every process we may signal but ourselves: that uid's
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
