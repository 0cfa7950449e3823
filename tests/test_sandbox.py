"""The sandbox: each layer alone (as root and as an unprivileged user made here), then a hostile
agent trying every way out of its session while other sessions keep answering.

Skips say which kernel feature is missing; nothing is skipped on the CI kernel (6.x, Landlock ABI 7).
"""

import asyncio
import ctypes
import ctypes.util
import os
import pickle
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from corral.agent_proc import sandbox as layers
from corral.supervisor import sandbox_plan as policy
from corral.supervisor.store import DEFAULT_SQLITE_NAME
from tests.agents.hostile import spawn
from tests.procs import start_server, wait_gone

ROOT = os.geteuid() == 0
ABI = layers.landlock_abi()
TEST_USER = "corral-sandbox-test"
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (the uid layer, useradd)")
needs_landlock = pytest.mark.skipif(not ABI, reason="this kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(layers.AUDIT_ARCH is None, reason=f"no seccomp table for {layers.MACHINE}")


@pytest.fixture(scope="module")
def unprivileged_uid():
    """The uid of a non-root user made for these tests (useradd), or skip where we cannot."""
    if not ROOT:
        return os.geteuid()  # already unprivileged
    try:
        return pwd.getpwnam(TEST_USER).pw_uid
    except KeyError:
        pass
    done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"useradd failed: {done.stderr.strip()}")
    return pwd.getpwnam(TEST_USER).pw_uid


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's tmp_path is root's 0700 one), removed afterwards."""
    import shutil
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix="corral-sandbox-test-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def code_data_tmp(shared_dir):
    """Three dirs anyone may use: code (holding mod.py), data (holding a secret db), tmp."""
    allowed, secret, own = shared_dir / "code", shared_dir / "data", shared_dir / "tmp"
    for d in (allowed, secret, own):
        d.mkdir()
        os.chmod(d, 0o777)
    (allowed / "mod.py").write_text("x = 1")
    (secret / "db").write_text("secret")
    os.chmod(secret / "db", 0o666)
    return allowed, secret, own


def in_child(fn, *, uid=None):
    """Run ``fn`` in a forked child (optionally as ``uid`` first); return what it returned or raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if uid is not None and uid != os.geteuid():
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            result = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - the parent asserts on it
            result = ("raised", f"{type(exc).__name__}: {exc}")
        os.write(w, pickle.dumps(result))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    assert status == "ok", value
    return value


def attempt(fn) -> str:
    """'ok' if fn() works, else the errno name it failed with."""
    try:
        fn()
        return "ok"
    except OSError as exc:
        return __import__("errno").errorcode.get(exc.errno, str(exc.errno))
    except ValueError:  # resource.setrlimit's way of saying EPERM
        return "EPERM"


def _has_cap(cap: int) -> bool:
    """Whether this process has a capability in its effective set."""
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def users():
    """Who the unprivileged layers run as: root, and the unprivileged test user."""
    return [pytest.param(None, id="as-root" if ROOT else "as-self"), pytest.param("user", id="unprivileged")]


def _as(who, unprivileged_uid):
    return unprivileged_uid if who == "user" else None


# ---------------------------------------------------------------- layers alone


def test_the_landlock_abi_is_probed():
    if not ABI:
        pytest.skip(f"kernel {os.uname().release} has no Landlock")
    assert ABI >= 1
    print(f"kernel {os.uname().release}: Landlock ABI {ABI}")


@needs_landlock
@pytest.mark.parametrize("who", users())
def test_landlock_allows_reading_only_the_given_paths_and_writing_only_the_temp_dir(shared_dir, who, unprivileged_uid):
    allowed, secret, own = code_data_tmp(shared_dir)

    def confined():
        layers.set_no_new_privs()
        layers.apply_landlock(ABI, [str(allowed)], [str(own)])
        return {
            "read code": attempt(lambda: open(allowed / "mod.py").read()),
            "read data": attempt(lambda: open(secret / "db").read()),
            "list data": attempt(lambda: os.listdir(secret)),
            "write code": attempt(lambda: open(allowed / "new", "w").close()),
            "write tmp": attempt(lambda: open(own / "mine", "w").close()),
            "read etc": attempt(lambda: open("/etc/hostname").read()),
        }

    assert in_child(confined, uid=_as(who, unprivileged_uid)) == {
        "read code": "ok", "read data": "EACCES", "list data": "EACCES", "write code": "EACCES",
        "write tmp": "ok", "read etc": "EACCES",
    }


@needs_landlock
@needs_seccomp
def test_layers_built_in_the_zygote_confine_the_same_and_leave_no_descriptor(shared_dir):
    allowed, secret, own = code_data_tmp(shared_dir)
    prebuilt = layers.prebuild({"prebuild": True, "landlock": ABI, "read_paths": [str(allowed)],
                                "device_paths": ["/dev/null"], "seccomp": True})
    held = set(prebuilt.landlock.fds)

    def confined():
        applied = layers.confine({"tmpdir": str(own), "landlock": ABI, "seccomp": True, "network": True}, prebuilt)
        return {
            "applied": applied,
            "read code": attempt(lambda: open(allowed / "mod.py").read()),
            "read data": attempt(lambda: open(secret / "db").read()),
            "write tmp": attempt(lambda: open(own / "mine", "w").close()),
            "write null": attempt(lambda: open("/dev/null", "w").close()),
            "unix socket": attempt(lambda: socket.socket(socket.AF_UNIX).close()),
            "descriptors kept": sorted(fd for fd in held if attempt(lambda: os.fstat(fd)) == "ok"),
        }

    try:
        assert in_child(confined) == {
            "applied": ["tmpdir", "no_new_privs", "landlock", "seccomp"], "read code": "ok", "read data": "EACCES",
            "write tmp": "ok", "write null": "ok", "unix socket": "EACCES", "descriptors kept": [],
        }
    finally:
        prebuilt.landlock.close()


def test_a_spawn_spec_carries_no_path_list_when_the_zygote_builds_the_rules(tmp_path):
    sb = policy.choose_sandbox("auto", uid_range=range(61000, 61003), protected=[str(tmp_path)])
    try:
        options = sb.zygote_options()
        spec = sb.prepare("s1-a")
        assert options["prebuild"] and options["read_paths"] == sb.read_paths
        assert "read_paths" not in spec and "write_paths" not in spec
    finally:
        sb.close()


@pytest.mark.skipif(ABI < 6, reason=f"Landlock ABI {ABI} < 6: no signal scoping on this kernel")
@pytest.mark.parametrize("who", users())
def test_landlock_scopes_signals_to_the_session(who, unprivileged_uid):
    uid = _as(who, unprivileged_uid)
    sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=(lambda: os.setresuid(uid, uid, uid)) if uid else None)
    try:
        def confined():
            layers.set_no_new_privs()
            layers.apply_landlock(ABI, [], [])
            own = os.fork()
            if own == 0:
                os._exit(0)
            os.waitpid(own, 0)  # its own children are in its domain: still fine to signal
            return attempt(lambda: os.kill(sleeper.pid, signal.SIGKILL))

        assert in_child(confined, uid=uid) == "EPERM"
        assert sleeper.poll() is None  # alive
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(ABI < 4, reason=f"Landlock ABI {ABI} < 4: no TCP rules on this kernel")
@needs_seccomp
@pytest.mark.parametrize("who", users())
def test_seccomp_refuses_a_new_unix_socket_but_not_a_socketpair(who, unprivileged_uid):
    """Landlock does not govern connect() to a path: without this an agent reaches PostgreSQL's socket."""
    server_dir = tempfile.mkdtemp()
    os.chmod(server_dir, 0o755)
    path = os.path.join(server_dir, "world.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)  # world-connectable, as PostgreSQL's and many daemons' sockets are
    listener.listen(1)

    def confined():
        layers.set_no_new_privs()
        before = attempt(lambda: _connect_unix(path))
        layers.apply_seccomp()
        return {"before": before, "after": attempt(lambda: _connect_unix(path)),
                "socketpair": attempt(lambda: [s.close() for s in socket.socketpair()])}

    try:
        assert in_child(confined, uid=_as(who, unprivileged_uid)) == {"before": "ok", "after": "EACCES", "socketpair": "ok"}
    finally:
        listener.close()
        shutil.rmtree(server_dir, ignore_errors=True)


def _connect_unix(path: str) -> None:
    """Connect to a unix socket at path, then hang up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)


@pytest.mark.parametrize("who", users())
def test_network_off_refuses_tcp_and_udp_but_not_unix_sockets(who, unprivileged_uid):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def confined():
        layers.set_no_new_privs()
        layers.apply_landlock(ABI, [], [], network=False)
        tcp_landlock = attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())
        layers.apply_seccomp(network=False)
        return {
            "tcp after landlock": tcp_landlock,
            "inet socket after seccomp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
            "unix socketpair": attempt(lambda: [s.close() for s in socket.socketpair()]),
        }

    try:
        assert in_child(confined, uid=_as(who, unprivileged_uid)) == {
            "tcp after landlock": "EACCES", "inet socket after seccomp": "EAFNOSUPPORT", "unix socketpair": "ok",
        }
    finally:
        listener.close()


@needs_seccomp
@pytest.mark.parametrize("who", users())
def test_seccomp_refuses_what_an_agent_never_needs_and_keeps_fork_and_threads(who, unprivileged_uid):
    nr = layers.SYSCALL_NUMBERS
    libc = ctypes.CDLL(None, use_errno=True)

    def raw(name, *args):
        def call():
            if libc.syscall(nr[name], *[ctypes.c_long(a) for a in args]) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return attempt(call)

    def confined():
        import threading

        layers.set_no_new_privs()
        layers.apply_seccomp()
        results = {name: raw(name, *args) for name, args in {
            "ptrace": (0, 0, 0, 0),  # PTRACE_TRACEME
            "process_vm_readv": (1, 0, 0, 0, 0, 0),
            "keyctl": (0, 0),
            "unshare": (0x10000000,),  # CLONE_NEWUSER
            "bpf": (0, 0, 0),
            "mount": (0, 0, 0, 0, 0),
            "perf_event_open": (0, 0, -1, -1, 0),
        }.items()}
        child = os.fork()
        if child == 0:
            os._exit(7)
        results["fork"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        results["thread"] = "ok"
        return results

    denied = {name: "EPERM" for name in ("ptrace", "process_vm_readv", "keyctl", "unshare", "bpf", "mount", "perf_event_open")}
    assert in_child(confined, uid=_as(who, unprivileged_uid)) == {**denied, "fork": 7, "thread": "ok"}


def _exec(path: str, fd: int | None = None) -> None:
    """Run a program to its end (by execveat on ``fd`` when given); raise the exec's OSError."""
    spawn(path, fd=fd)


def _memfd_copy(flags: int) -> int:
    """A memfd holding /bin/true."""
    fd = os.memfd_create("copy", flags)
    with open("/bin/true", "rb") as f:
        os.write(fd, f.read())
    return fd


SIDE_DOORS = {  # what each answered on this kernel before the filter shut it
    "io_uring_setup": lambda: _raise_errno(ctypes.CDLL(None, use_errno=True).syscall(425, 1, ctypes.create_string_buffer(120))),
    "netlink socket": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close(),
    "vsock socket": lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close(),
    "packet socket": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM).close(),
    "unix socket": lambda: socket.socket(socket.AF_UNIX).close(),
    "run a memfd by /proc/self/fd": lambda: _exec(f"/proc/self/fd/{_memfd_copy(0)}"),
    "run a memfd by execveat": lambda: _exec("", _memfd_copy(0)),
    "an MFD_EXEC memfd": lambda: _memfd_copy(0x10),
}


def _raise_errno(result: int) -> None:
    """Raise the errno of a raw syscall that returned -1."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(result)


@needs_seccomp
@pytest.mark.parametrize("who", users())
def test_seccomp_shuts_io_uring_other_socket_families_and_running_a_memfd(who, unprivileged_uid):
    def confined():
        layers.set_no_new_privs()
        layers.apply_seccomp()
        return {
            **{name: attempt(door) for name, door in SIDE_DOORS.items()},
            "inet sockets": attempt(lambda: [socket.socket(f, socket.SOCK_DGRAM).close() for f in (2, 10)]),
            "socketpair": attempt(lambda: [s.close() for s in socket.socketpair()]),
            "a no-exec memfd": attempt(lambda: os.close(_memfd_copy(0x8))),  # MFD_NOEXEC_SEAL: still usable
            "run /bin/true": attempt(lambda: _exec("/bin/true")),
        }

    assert in_child(confined, uid=_as(who, unprivileged_uid)) == {
        "io_uring_setup": "EPERM", "netlink socket": "EAFNOSUPPORT", "vsock socket": "EAFNOSUPPORT",
        "packet socket": "EAFNOSUPPORT", "unix socket": "EACCES", "run a memfd by /proc/self/fd": "EACCES",
        "run a memfd by execveat": "EACCES", "an MFD_EXEC memfd": "EACCES",
        "inet sockets": "ok", "socketpair": "ok", "a no-exec memfd": "ok", "run /bin/true": "ok",
    }


@needs_landlock
@pytest.mark.parametrize("who", users())
def test_landlock_runs_nothing_from_the_temp_dir(shared_dir, who, unprivileged_uid):
    allowed, _secret, own = code_data_tmp(shared_dir)
    shutil.copy("/bin/true", own / "copy")
    os.chmod(own / "copy", 0o755)

    def confined():
        layers.set_no_new_privs()
        layers.apply_landlock(ABI, ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", str(allowed)], [str(own)])
        return {"system binary": attempt(lambda: _exec("/bin/true")),
                "copy in the temp dir": attempt(lambda: _exec(str(own / "copy"))),
                "write the temp dir": attempt(lambda: open(own / "new", "w").close())}

    assert in_child(confined, uid=_as(who, unprivileged_uid)) == {
        "system binary": "ok", "copy in the temp dir": "EACCES", "write the temp dir": "ok"}


@needs_seccomp
def test_the_seccomp_syscall_numbers_match_libseccomp():
    path = ctypes.util.find_library("seccomp")
    if path is None:
        pytest.skip("libseccomp is not installed: nothing to check the tables against")
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    for arch, (token, numbers) in layers._ARCHES.items():
        for name, number in numbers.items():
            assert lib.seccomp_syscall_resolve_name_arch(token, name.encode()) == number, (arch, name)


@needs_root
def test_the_uid_drop_leaves_no_capabilities_and_no_way_back():
    def dropped():
        layers.drop_capabilities()
        layers.drop_to_uid(60999, 60999)
        status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
        return {
            "ids": (os.getresuid(), os.getresgid(), os.getgroups()),
            "caps": {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")},
            "setuid 0": attempt(lambda: os.setuid(0)),
        }

    assert in_child(dropped) == {
        "ids": ((60999,) * 3, (60999,) * 3, []),
        "caps": {"CapEff": 0, "CapPrm": 0, "CapBnd": 0, "CapAmb": 0},
        "setuid 0": "EPERM",
    }


@pytest.mark.parametrize("who", users())
def test_limits_and_no_new_privs_cannot_be_undone(who, unprivileged_uid):
    def limited():
        layers.limit_open_files(64)
        layers.set_no_new_privs()
        libc = ctypes.CDLL(None, use_errno=True)
        return {
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "raise nofile": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))),
            "no_new_privs": libc.prctl(39, 0, 0, 0, 0),  # PR_GET_NO_NEW_PRIVS
        }

    out = in_child(limited, uid=_as(who, unprivileged_uid))
    # root with CAP_SYS_RESOURCE may raise it until the uid drop; any other user may not
    assert out["nofile"] == (64, 64) and out["no_new_privs"] == 1
    assert out["raise nofile"] == ("ok" if who is None and ROOT and _has_cap(24) else "EPERM")


@needs_root
def test_rlimit_nproc_bounds_a_uid_fork_bomb():
    def bomb():
        layers.limit_processes(8)
        layers.drop_to_uid(60998, 60998)
        made = []
        try:
            for _ in range(100):
                pid = os.fork()
                if pid == 0:
                    signal.pause()
                made.append(pid)
        except OSError:
            pass
        for pid in made:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return len(made)

    assert in_child(bomb) == 7  # 8 processes of the uid: itself and 7 children


# ---------------------------------------------------------------- the policy


def test_uid_ranges_parse_and_bad_ones_are_refused():
    assert policy.parse_uid_range("60000-60999") == range(60000, 61000)
    for bad in ("0-10", "10-5", "abc", "60000"):
        with pytest.raises(ValueError, match="uid range"):
            policy.parse_uid_range(bad)


def test_a_read_path_holding_corral_files_is_dropped(tmp_path):
    allowed, dropped = policy.safe_read_paths([str(tmp_path), "/usr"], [str(tmp_path / "data")])
    assert (allowed, dropped) == (["/usr"], [str(tmp_path)])


def test_strict_refuses_to_start_without_a_layer_and_says_which(monkeypatch):
    monkeypatch.setattr(layers, "landlock_abi", lambda: 0)  # a kernel without Landlock, at the OS edge
    with pytest.raises(policy.SandboxRefused, match=r"landlock \(the kernel has no Landlock"):
        policy.choose_sandbox("strict")
    auto = policy.choose_sandbox("auto")
    try:
        assert auto.layers["landlock"] == {"in_force": False, "reason": "the kernel has no Landlock (needs >= 5.13 with lsm=landlock)"}
    finally:
        auto.close()


@needs_root
def test_each_session_gets_its_own_uid_and_temp_dir_and_both_come_back(tmp_path):
    sb = policy.choose_sandbox("strict", uid_range=range(61000, 61003), protected=[str(tmp_path)])
    try:
        a, b = sb.prepare("s1-a"), sb.prepare("s1-b")
        assert (a["uid"], b["uid"]) == (61000, 61001)
        st = os.stat(a["tmpdir"])
        assert (st.st_uid, st.st_mode & 0o777) == (61000, 0o700)
        sb.prepare("s1-c")
        with pytest.raises(OSError, match="every sandbox uid"):
            sb.prepare("s1-d")
        sb.release(a)
        assert sb.prepare("s2-a")["uid"] == 61000  # at once: the temp dir goes on the remover's thread
        assert sb.remover.drain(10) and not os.path.exists(a["tmpdir"])
    finally:
        sb.close()


# ---------------------------------------------------------------- a hostile agent in a live server


def ns_pid(pid: int) -> int:
    """A process's pid in its innermost pid namespace (what another agent would see)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


async def attack(sup, s, what, **args):
    """Run one attack from inside a session; return the agent's {"escaped", "detail"}."""
    return (await sup.command(s, "attack", {"what": what, **args}))["reply"]


@pytest.fixture
async def hostile_setup(make_supervisor, tmp_path):
    """A supervisor running Escaper agents: an attacker and a victim (another tenant) with a turn done."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text('[tenants.victim]\nkeys = ["victim-key"]\n')
    sup = await make_supervisor(agent="tests.agents.hostile:Escaper", tenants=tenants, max_pids=16)
    victim = await sup.get_or_create("victim", "victim")
    attacker = await sup.get_or_create("attacker", "mallory")
    await sup.chat(victim, "my name is Victoria")
    await sup.chat(attacker, "hello")
    return sup, attacker, victim


@needs_root
async def test_an_agent_forked_by_the_zygote_holds_its_uid_and_no_capability(hostile_setup):
    sup, attacker, _ = hostile_setup
    held = (await sup.command(attacker, "privileges", {}))["reply"]
    uid = attacker.sandbox["uid"]
    assert held["ids"] == [[uid] * 3, [uid] * 3, []]
    # the bounding and ambient sets were emptied once in the zygote (agent_proc/sandbox.py Prebuilt)
    assert {k: held[k] for k in ("effective", "permitted", "inheritable", "bounding", "ambient", "no_new_privs")} == {
        "effective": 0, "permitted": 0, "inheritable": 0, "bounding": [], "ambient": [], "no_new_privs": 1}


async def test_every_way_out_of_the_session_fails_and_the_others_keep_answering(hostile_setup):
    sup, attacker, victim = hostile_setup
    if not (sup.sandbox.on("landlock") or sup.sandbox.on("uid")):
        pytest.skip("neither Landlock nor root here: no filesystem layer to test")
    control = await attack(sup, attacker, "tmp")
    assert control["escaped"] and control["detail"]["tmpdir"] == attacker.sandbox["tmpdir"]
    assert control["detail"]["gettempdir"] == attacker.sandbox["tmpdir"]  # not the zygote's TMPDIR, the parent
    data_dir, run_dir = str(sup.config.data_dir), sup.run_dir
    attempts = {
        "read /proc/1/environ": ("read", {"path": "/proc/1/environ"}),
        "database via /proc/<supervisor>/fd": ("proc_fds", {"pid": os.getpid()}),
        "read the database": ("read", {"path": os.path.join(data_dir, DEFAULT_SQLITE_NAME)}),
        "list the data dir": ("list", {"path": data_dir}),
        "read the tenants file": ("read", {"path": str(sup.config.tenants)}),
        "list the run dir": ("list", {"path": run_dir}),
        # the hub has no socket to connect to (tests/test_hub_door.py); a socket a local server listens
        # on, under the supervisor's 0700 run dir's parent, is what an agent would try next
        "connect to a unix socket of the host": ("connect_unix", {"path": "/run/postgresql/.s.PGSQL.5432"}),
        # The hub listens on nothing (tests/test_hub_door.py): where its socket used to be.
        "connect to the hub": ("connect_unix", {"path": os.path.join(run_dir, "agents.sock")}),
        "write in the data dir": ("write", {"path": os.path.join(data_dir, "owned")}),
        "write in /tmp": ("write", {"path": "/tmp/corral-owned"}),
        "list the victim's temp dir": ("list", {"path": victim.sandbox["tmpdir"]}),
        "write in the victim's temp dir": ("write", {"path": os.path.join(victim.sandbox["tmpdir"], "owned")}),
        "raise its open-files limit": ("rlimit", {}),
        "ptrace the zygote": ("ptrace", {"pid": sup.spawner.pid}),
        "kill -9 the victim's agent": ("kill", {"pid": victim.pid}),
        "kill -9 the victim's agent by its pid in the agents' namespace": ("kill", {"pid": ns_pid(victim.pid)}),
        "kill -9 the zygote": ("kill", {"pid": sup.spawner.pid}),
    }
    for name, nr in (("mount", ()), ("unshare", (0x10000000,)), ("keyctl", (0, 0)), ("bpf", (0, 0, 0))):
        attempts[f"syscall {name}"] = ("syscall", {"nr": layers.SYSCALL_NUMBERS[name], "args": list(nr) or [0] * 5})
    results = {}
    for name, (what, args) in attempts.items():
        results[name] = await attack(sup, attacker, what, **args)
    escaped = {name: r["detail"] for name, r in results.items() if r["escaped"]}
    print("\n".join(f"{name}: {r['detail']}" for name, r in results.items()))
    assert escaped == {}
    assert not os.path.exists("/tmp/corral-owned")
    assert (await sup.chat(victim, "what is my name?"))["reply"] == "Your name is Victoria."
    assert (await sup.chat(attacker, "still here"))["reply"] == "You said: still here"
    assert sup.health()["live_sessions"] == 2


async def test_the_side_doors_are_shut_for_a_live_agent(hostile_setup):
    sup, attacker, victim = hostile_setup
    if not (sup.sandbox.on("seccomp") and sup.sandbox.on("landlock")):
        pytest.skip("needs seccomp and Landlock")
    controls = {"run /bin/true": ("run", {"path": "/bin/true"}), "a TCP socket": ("socket", {"family": 2, "type": 1})}
    doors = {
        "io_uring": ("io_uring", {}),
        "a netlink socket (route)": ("socket", {"family": socket.AF_NETLINK, "type": socket.SOCK_RAW}),
        "a netlink socket (uevent)": ("socket", {"family": socket.AF_NETLINK, "type": socket.SOCK_DGRAM, "proto": 15}),
        "a vsock socket": ("socket", {"family": socket.AF_VSOCK, "type": socket.SOCK_STREAM}),
        "a packet socket": ("socket", {"family": socket.AF_PACKET}),
        "a unix datagram socket": ("socket", {"family": socket.AF_UNIX}),
        "run a binary copied into TMPDIR": ("run_copy", {"path": "/bin/true"}),
        "run a memfd": ("run_memfd", {"path": "/bin/true"}),
        "run an MFD_EXEC memfd": ("run_memfd", {"path": "/bin/true", "flags": 0x10}),
    }
    results = {name: await attack(sup, attacker, what, **args) for name, (what, args) in {**controls, **doors}.items()}
    print("\n".join(f"{name}: {r['detail']}" for name, r in results.items()))
    assert {name for name, r in results.items() if r["escaped"]} == set(controls)
    assert (await sup.chat(victim, "what is my name?"))["reply"] == "Your name is Victoria."


async def test_a_full_temp_dir_says_enospc_and_the_agent_lives(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:Escaper", agent_disk=2 * 1024 * 1024)
    if not sup.sandbox.on("disk"):
        pytest.skip(f"no disk layer here: {sup.sandbox.layers['disk']['reason']}")
    s = await sup.get_or_create("filler", "t")
    filled = await attack(sup, s, "fill", most=64 * 1024 * 1024)
    assert not filled["escaped"] and "No space left on device after 2097152 bytes" in filled["detail"]
    files = await attack(sup, s, "files", most=100_000)
    assert not files["escaped"] and "No space left on device after" in files["detail"]
    assert int(files["detail"].split("after ")[1].split()[0]) < 1024  # nr_inodes: the bound's, not the host's
    assert (await sup.chat(s, "still here"))["reply"] == "You said: still here"
    assert os.listdir(s.sandbox["tmpdir"]) == []  # the supervisor's side of the mount: nothing of it
    tmpdir = s.sandbox["tmpdir"]
    await sup.remove(s)
    assert sup.sandbox.remover.drain(10) and not os.path.exists(tmpdir)


def test_strict_refuses_to_start_without_the_disk_bound_as_root(monkeypatch):
    if not ROOT:
        pytest.skip("the disk bound is demanded of root")
    from corral.agent_proc import disk

    monkeypatch.setattr(disk, "probe", lambda **_: "unshare(CLONE_NEWNS): Operation not permitted")  # the OS edge
    with pytest.raises(policy.SandboxRefused, match=r"disk \(cannot mount a tmpfs"):
        policy.choose_sandbox("strict", disk=1 << 20)
    sb = policy.choose_sandbox("strict", disk=0)  # --agent-disk 0 asks for no bound: nothing missing
    try:
        assert sb.layers["disk"]["reason"].startswith("--agent-disk 0")
    finally:
        sb.close()


@needs_root
async def test_a_fork_bomb_stops_at_max_pids_and_dies_with_its_session(hostile_setup):
    sup, attacker, victim = hostile_setup
    uid = attacker.sandbox["uid"]
    forked = (await attack(sup, attacker, "fork_bomb", most=1000))["detail"]["forked"]
    assert forked < 16  # max_pids counts the agent itself
    mine = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
    assert len(mine) == forked + 1
    assert (await sup.chat(victim, "what is my name?"))["reply"] == "Your name is Victoria."
    await sup.kill(attacker)
    assert wait_gone(mine, timeout=5) == []


@needs_root
async def test_setsid_and_double_fork_die_when_the_session_ends(hostile_setup):
    sup, attacker, _ = hostile_setup
    uid = attacker.sandbox["uid"]
    await attack(sup, attacker, "escape_tree")
    leftovers = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid
                 and p.pid != attacker.pid]
    assert len(leftovers) == 1 and psutil.Process(leftovers[0]).ppid() != attacker.pid  # reparented away
    await sup.remove(attacker)
    assert wait_gone(leftovers, timeout=5) == []


@needs_root
async def test_nothing_a_session_started_outlives_a_sigkilled_server(tmp_path):
    from tests.chaos_kit import call, client_session

    proc, url = await asyncio.to_thread(start_server, tmp_path, "--agent", "tests.agents.hostile:Escaper",
                                        "--sandbox", "strict", "--sandbox-uid-range", "62000-62009")
    try:
        async with client_session() as http:
            for sid in ("a", "b"):
                status, body = await call(http, "POST", url + "/api/mcp-command",
                                          json={"command": "attack", "args": {"what": "escape_tree"}, "session_id": sid})
                assert status == 200, body
        ours = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and 62000 <= p.info["uids"].real <= 62009]
        assert len(ours) == 4  # two agents, two setsid'ed grandchildren
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert await asyncio.to_thread(wait_gone, [p.pid for p in ours], 5.0) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_network_off_keeps_an_agent_off_tcp_and_udp(make_supervisor):
    sup = await make_supervisor(agent="tests.agents.hostile:Escaper", agent_network="off")
    if not (sup.sandbox.on("seccomp") and sup.sandbox.layers["landlock"].get("abi", 0) >= 4):
        pytest.skip("needs seccomp and Landlock ABI >= 4")
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        s = await sup.get_or_create("offline", "t")
        port = listener.getsockname()[1]
        assert not (await attack(sup, s, "tcp", port=port))["escaped"]
        assert not (await attack(sup, s, "udp", port=port))["escaped"]
    finally:
        listener.close()


async def test_the_admin_health_lists_every_layer_and_why_one_is_missing(sup):
    described = sup.health()["sandbox"]
    assert described["mode"] == "auto"
    assert set(described["layers"]) >= {"uid", "capabilities", "pid_namespace", "no_new_privs", "landlock",
                                        "landlock_scope", "seccomp", "tmpdir", "disk"}
    for layer in described["layers"].values():
        assert ("detail" if layer["in_force"] else "reason") in layer


def test_sandbox_flags_reach_the_config(capsys):
    from corral.web.cli import build_parser, config_from

    args = build_parser().parse_args(["serve", "--sandbox", "strict", "--sandbox-uid-range", "70000-70099",
                                      "--agent-network", "off", "--max-pids", "32", "--max-open-files", "256"])
    config = config_from(args, environ={})
    assert (config.sandbox, config.uid_range, config.agent_network, config.max_pids, config.max_open_files) == (
        "strict", range(70000, 70100), "off", 32, 256)
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["serve", "--sandbox", "maybe"])
    assert refused.value.code == 1 and "expected one of auto, strict, off (got 'maybe')" in capsys.readouterr().err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
