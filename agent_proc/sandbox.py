"""The sandbox layers an agent process puts itself in right after the fork (stdlib + ctypes only).

Each layer is one small function taking plain values, so it can be tested alone. The supervisor
decides which layers a host gets (``supervisor.sandbox_plan``) and sends a plain-dict spec through the
zygote; ``confine`` applies it in the order the kernel needs: what needs root first (rlimits, the
uid drop), then ``no_new_privs``, Landlock and seccomp, which any user may apply to itself.
"""
from __future__ import annotations

import ctypes
import os
import platform
import resource
import select
import struct

from corral.agent_proc.libc import LIBC as _libc, check as _check

__all__ = [
    "confine", "unshare_pid_namespace", "landlock_abi", "set_subreaper", "set_no_new_privs",
    "drop_capabilities", "drop_to_uid", "limit_processes", "limit_open_files", "apply_landlock",
    "apply_seccomp", "use_private_tmpdir", "parent_gone", "DENIED_SYSCALLS", "SYSCALL_NUMBERS", "set_capabilities",
    "Prebuilt", "prebuild",
]

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLONE_NEWPID = 0x20000000
_CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

# ---------------------------------------------------------------- syscall numbers per architecture

# (audit arch token, syscall numbers); checked against libseccomp's table in tests/test_sandbox.py.
_ARCHES = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446, "socket": 41, "socketpair": 53, "memfd_create": 319, "execveat": 322,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "kcmp": 312,
        "keyctl": 250, "add_key": 248, "request_key": 249, "mount": 165, "umount2": 166,
        "pivot_root": 155, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "unshare": 272, "setns": 308,
        "bpf": 321, "perf_event_open": 298, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168,
        "reboot": 169, "acct": 163, "quotactl": 179, "syslog": 103, "userfaultfd": 323,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "iopl": 172, "ioperm": 173,
    }),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
        "landlock_restrict_self": 446, "socket": 198, "socketpair": 199, "memfd_create": 279, "execveat": 281,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438, "kcmp": 272,
        "keyctl": 219, "add_key": 217, "request_key": 218, "mount": 40, "umount2": 39,
        "pivot_root": 41, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "move_mount": 429, "open_tree": 428, "mount_setattr": 442, "unshare": 97, "setns": 268,
        "bpf": 280, "perf_event_open": 241, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225,
        "reboot": 142, "acct": 89, "quotactl": 60, "syslog": 116, "userfaultfd": 282,
        "open_by_handle_at": 265, "name_to_handle_at": 264,
    }),
}
MACHINE = platform.machine()
AUDIT_ARCH, SYSCALL_NUMBERS = _ARCHES.get(MACHINE, (None, {}))

# What an agent never needs: other processes' memory, the kernel keyring, mounts and namespaces,
# kernel modules and BPF, perf counters, swap and reboot, io_uring (its operations, IORING_OP_SOCKET
# among them, are not syscalls a filter sees). Each answers EPERM.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "keyctl", "add_key", "request_key",
    "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
    "open_tree", "mount_setattr", "unshare", "setns",
    "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)
# clone() flags that make namespaces: refused, so the agent cannot leave its pid namespace.
_CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10
_MFD_NOEXEC_SEAL, _MFD_EXEC = 0x0008, 0x0010
_AT_EMPTY_PATH = 0x1000
_EPERM, _EACCES, _ENOSYS, _EAFNOSUPPORT = 1, 13, 38, 97


def _prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    """prctl(2) with unused trailing arguments zeroed."""
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0), what)


# ---------------------------------------------------------------- process tree

def unshare_pid_namespace() -> None:
    """Put the children we fork from now on in a new pid namespace (needs CAP_SYS_ADMIN).

    The first child is its pid 1: when that one dies, the kernel kills everything else in it.
    """
    _check(_libc.unshare(_CLONE_NEWPID), "unshare(CLONE_NEWPID)")


def parent_gone(parent_pidfd: int) -> bool:
    """Whether the process behind a pidfd has exited (a pidfd reads ready once it has)."""
    ready, _, _ = select.select([parent_pidfd], [], [], 0)
    return bool(ready)


def set_subreaper() -> None:
    """Become the reaper of our orphaned descendants, so a double fork cannot escape to init."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1, what="prctl(PR_SET_CHILD_SUBREAPER)")


# ---------------------------------------------------------------- limits

def limit_open_files(count: int) -> None:
    """Cap open files (soft and hard, so the agent cannot raise it back)."""
    _lower_both(resource.RLIMIT_NOFILE, count)


def limit_processes(count: int) -> None:
    """Cap processes of our uid (RLIMIT_NPROC): a per-session bound once each session has its own uid."""
    _lower_both(resource.RLIMIT_NPROC, count)


def _lower_both(which: int, value: int) -> None:
    """Set soft and hard limit to ``value``, never above an existing hard limit."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard
    resource.setrlimit(which, (value, value))


# ---------------------------------------------------------------- identity

def drop_capabilities(last: int | None = None) -> None:
    """Empty the bounding and ambient capability sets (needs CAP_SETPCAP, so as root, before the uid drop)."""
    if last is None:
        with open(_CAP_LAST_CAP_FILE) as f:
            last = int(f.read())
    for cap in range(last + 1):
        _prctl(_PR_CAPBSET_DROP, cap, what=f"prctl(PR_CAPBSET_DROP, {cap})")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="prctl(PR_CAP_AMBIENT_CLEAR_ALL)")


_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set: capabilities 0-63
CAP_SYS_ADMIN = 21


def set_capabilities(keep: int = 0) -> None:
    """Make the effective and permitted sets ``keep`` (a bit mask of capabilities 0-31) and the inheritable one empty."""
    header = ctypes.create_string_buffer(struct.pack("=Ii", _CAPABILITY_VERSION_3, 0))
    data = ctypes.create_string_buffer(struct.pack("=6I", keep, keep, 0, 0, 0, 0), 24)  # (eff, perm, inh) x 2 words
    _check(_libc.capset(header, data), "capset")


def drop_to_uid(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for real, effective and saved ids, with no supplementary groups.

    Moving every uid off 0 clears the permitted and effective capabilities too.
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(_EPERM, f"uid drop to {uid}:{gid} did not take")


def set_no_new_privs() -> None:
    """No execve can grant privileges again (setuid binaries, file capabilities)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")


def use_private_tmpdir(path: str) -> None:
    """Point TMPDIR (and Python's tempfile) at the session's own directory."""
    os.environ["TMPDIR"] = path
    import tempfile

    tempfile.tempdir = path


# ---------------------------------------------------------------- Landlock

_LANDLOCK_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
# filesystem rights by the ABI that introduced them
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_READ_RIGHTS = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled)."""
    nr = SYSCALL_NUMBERS.get("landlock_create_ruleset")
    if nr is None:
        return 0
    abi = _libc.syscall(nr, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(abi, 0)


def _fs_rights(abi: int) -> int:
    """Every filesystem right the given ABI knows (all of them are handled, i.e. denied by default)."""
    rights = _FS_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def apply_landlock(abi: int, read_paths, write_paths, *, network: bool = True) -> None:
    """Confine this process: read (and run) only ``read_paths``, write (never run) only ``write_paths``.

    From ABI 4, with ``network`` off, TCP bind and connect are refused; from ABI 6, signals and
    abstract unix sockets cannot reach outside this process's own Landlock domain (its session).
    ptrace of any process outside the domain is refused by every ABI. Paths that do not exist are
    skipped. Needs no_new_privs (or CAP_SYS_ADMIN).
    """
    rules = LandlockRules(abi, read_paths, write_paths)
    try:
        rules.restrict(network=network)
    finally:
        rules.close()


def _ruleset_attr(abi: int, network: bool) -> bytes:
    """struct landlock_ruleset_attr for this ABI: every filesystem right handled, TCP when network is off, scopes."""
    handled_net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 and not network else 0
    scoped = (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    return struct.pack("=QQQ", _fs_rights(abi), handled_net, scoped)[:size]


class LandlockRules:
    """Landlock rules built ahead: each path opened (O_PATH) and its rule struct packed once.

    Built in the zygote, the child only makes the syscalls: nothing it does dirties a page for them.
    """

    def __init__(self, abi: int, read_paths=(), write_paths=()):
        if abi < 1:
            raise OSError(_ENOSYS, "this kernel has no Landlock")
        self.abi = abi
        self.handled = _fs_rights(abi)
        # Writable is never executable: a binary the agent wrote (or copied) into its temp dir cannot run.
        self.writable = self.handled & ~_FS_EXECUTE
        self.attrs = {network: _ruleset_attr(abi, network) for network in (True, False)}
        self.rules: list[bytes] = []
        self.fds: list[int] = []
        for path in read_paths:
            self.add(path, _READ_RIGHTS)
        for path in write_paths:
            self.add(path, self.writable)

    def add(self, path: str, rights: int) -> None:
        """Open one path and pack its path-beneath rule (only file rights when it is a file); absent paths are skipped."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # absent on this host (e.g. /lib64): nothing to allow
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        self.fds.append(fd)
        self.rules.append(struct.pack("=Qi", rights & self.handled, fd))

    def restrict(self, *, network: bool = True, extra: bytes | None = None) -> None:
        """Create the ruleset, add every rule (and ``extra``, one packed rule), restrict ourselves."""
        attr = self.attrs[network]
        nrs = SYSCALL_NUMBERS
        ruleset = _check(_libc.syscall(nrs["landlock_create_ruleset"], attr, ctypes.c_size_t(len(attr)),
                                       ctypes.c_uint32(0)), "landlock_create_ruleset")
        try:
            for rule in self.rules if extra is None else (*self.rules, extra):
                _check(_libc.syscall(nrs["landlock_add_rule"], ruleset, ctypes.c_int(_RULE_PATH_BENEATH),
                                     rule, ctypes.c_uint32(0)), "landlock_add_rule")
            _check(_libc.syscall(nrs["landlock_restrict_self"], ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
        finally:
            os.close(ruleset)

    def close(self) -> None:
        """Close the O_PATH descriptors (in the child once it is confined: the agent keeps none)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------- seccomp

# classic BPF opcodes
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO, _SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (args are little-endian u64)
_ARG_SIZE = 8
_X32_BIT = 0x40000000


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    """One struct sock_filter."""
    return struct.pack("=HBBI", code, jt, jf, k)


def _arg(index: int) -> bytes:
    """Load the low 32 bits of syscall argument ``index`` (every argument checked here is an int)."""
    return _insn(_LD_W_ABS, _ARG0_LOW + _ARG_SIZE * index)


def _errno(err: int) -> bytes:
    """Return ``err`` to the caller."""
    return _insn(_RET_K, _SECCOMP_RET_ERRNO | err)


def _when(nr_name: str, body: list[bytes]) -> list[bytes]:
    """Run ``body`` (which always returns) for one syscall; other syscalls skip it with the number still loaded."""
    return [_insn(_JEQ_K, SYSCALL_NUMBERS[nr_name], 0, len(body)), *body]


def _socket_rule(network: bool) -> list[bytes]:
    """socket(): AF_INET/AF_INET6 with ``network``; AF_UNIX EACCES; every other family EAFNOSUPPORT."""
    if not network:
        return [_arg(0), _insn(_JEQ_K, _AF_UNIX, 1, 0), _errno(_EAFNOSUPPORT), _errno(_EACCES)]
    allow = _insn(_RET_K, _SECCOMP_RET_ALLOW)
    return [_arg(0), _insn(_JEQ_K, _AF_INET, 4, 0), _insn(_JEQ_K, _AF_INET6, 3, 0), _insn(_JEQ_K, _AF_UNIX, 1, 0),
            _errno(_EAFNOSUPPORT), _errno(_EACCES), allow]


def seccomp_program(*, network: bool = True) -> bytes:
    """The filter: other architectures killed, DENIED_SYSCALLS refused, namespaced clones refused, side doors shut.

    clone3 answers ENOSYS (libc falls back to clone, whose flags a filter can read). socket() makes
    only AF_INET/AF_INET6 sockets, none with ``network`` off (UDP included, which Landlock misses):
    AF_UNIX is refused because Landlock does not govern connect() to a path, so an agent could reach
    any world-connectable socket on the host (PostgreSQL's, a container runtime's); netlink, vsock,
    packet and the rest reach the kernel's and the host's other ends. socketpair() stays, AF_UNIX only
    (asyncio's self-pipe). Nothing an agent wrote runs: execveat() on a descriptor (AT_EMPTY_PATH) is
    refused, and memfd_create() must ask for MFD_NOEXEC_SEAL (what vm.memfd_noexec = 2 enforces), since
    Landlock sees no path for a memfd run through /proc/self/fd.
    """
    if AUDIT_ARCH is None:
        raise OSError(_ENOSYS, f"no seccomp table for {MACHINE}")
    denied = [SYSCALL_NUMBERS[name] for name in DENIED_SYSCALLS if name in SYSCALL_NUMBERS]
    allow = _insn(_RET_K, _SECCOMP_RET_ALLOW)
    prog = [_insn(_LD_W_ABS, _ARCH), _insn(_JEQ_K, AUDIT_ARCH, 1, 0), _insn(_RET_K, _SECCOMP_RET_KILL_PROCESS),
            _insn(_LD_W_ABS, _NR)]
    if MACHINE == "x86_64":
        prog += [_insn(_JGE_K, _X32_BIT, 0, 1), _errno(_EPERM)]  # the x32 ABI is another door
    for nr in denied:
        prog += [_insn(_JEQ_K, nr, 0, 1), _errno(_EPERM)]
    prog += _when("clone3", [_errno(_ENOSYS)])
    prog += _when("clone", [_arg(0), _insn(_JSET_K, _CLONE_NAMESPACE_FLAGS, 0, 1), _errno(_EPERM), allow])
    prog += _when("socket", _socket_rule(network))
    prog += _when("socketpair", [_arg(0), _insn(_JEQ_K, _AF_UNIX, 0, 1), allow, _errno(_EAFNOSUPPORT)])
    prog += _when("execveat", [_arg(4), _insn(_JSET_K, _AT_EMPTY_PATH, 0, 1), _errno(_EACCES), allow])
    prog += _when("memfd_create", [_arg(1), _insn(_JSET_K, _MFD_EXEC, 1, 0), _insn(_JSET_K, _MFD_NOEXEC_SEAL, 1, 0),
                                   _errno(_EACCES), allow])
    prog.append(allow)
    return b"".join(prog)


class SeccompFilter:
    """The filter's program and its struct sock_fprog, packed into C buffers once (in the zygote)."""

    def __init__(self, *, network: bool = True):
        prog = seccomp_program(network=network)
        self.prog = ctypes.create_string_buffer(prog, len(prog))
        fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ctypes.addressof(self.prog))
        self.fprog = ctypes.create_string_buffer(fprog, len(fprog))

    def install(self) -> None:
        """Install the filter on this process and everything it forks (needs no_new_privs)."""
        _check(_libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), self.fprog, 0, 0),
               "prctl(PR_SET_SECCOMP)")


def apply_seccomp(*, network: bool = True) -> None:
    """Install the filter on this process and everything it forks (needs no_new_privs)."""
    SeccompFilter(network=network).install()


# ---------------------------------------------------------------- built once, in the zygote

class Prebuilt:
    """What every child's ``confine`` needs that does not depend on the session, built before the fork.

    A child that packs structs, walks the read-path list and opens paths dirties copy-on-write pages
    (about 0.5 MB per idle session measured, docs/benchmarks.md); with these built in the zygote it only
    makes the syscalls.
    """

    def __init__(self, options: dict):
        abi = int(options.get("landlock") or 0)
        self.landlock = LandlockRules(abi, options.get("read_paths", ()), options.get("device_paths", ())) if abi else None
        self.seccomp = ({network: SeccompFilter(network=network) for network in (True, False)}
                        if options.get("seccomp") else {})
        with open(_CAP_LAST_CAP_FILE) as f:
            self.last_cap = int(f.read())
        # The zygote's own TMPDIR is the agents' temp dirs' parent (which nobody may list): each agent
        # then replaces the variable instead of adding one (the rehearsal warms that path too).
        self.tmp_parent = options.get("tmp_parent")
        if self.tmp_parent:
            use_private_tmpdir(self.tmp_parent)
        # The zygote never execs and keeps its effective capabilities (its children need them to
        # take their uids), so as root it empties the bounding and ambient sets once for them all.
        self.capabilities_dropped = bool(options.get("bounding_set"))
        if self.capabilities_dropped:
            drop_capabilities(self.last_cap)
        for name in ("prctl", "syscall", "setgroups", "capset"):
            getattr(_libc, name)  # ctypes caches a function on first lookup: do it here, not in each child


def prebuild(options: dict | None) -> Prebuilt | None:
    """The zygote's ``Prebuilt`` for its sandbox options (None when there is no sandbox)."""
    if not options or not options.get("prebuild"):
        return None
    return Prebuilt(options)


# ---------------------------------------------------------------- all together

def confine(spec: dict | None, prebuilt: Prebuilt | None = None) -> list[str]:
    """Apply the sandbox spec the supervisor chose to the calling process; return the layers applied.

    With ``prebuilt`` (the zygote's), the Landlock rules and seccomp filter are the ones built before
    the fork. Raises OSError when a layer the spec asks for cannot be applied: the agent must not run
    with less than the supervisor reported.
    """
    spec = spec or {}
    applied = []
    if spec.get("tmpdir"):
        use_private_tmpdir(spec["tmpdir"])
        applied.append("tmpdir")
    if spec.get("max_open_files"):
        limit_open_files(int(spec["max_open_files"]))
        applied.append("open_files")
    if spec.get("clear_capabilities"):  # not root: what the zygote kept of its user namespace's, to mount
        set_capabilities(0)
        applied.append("capabilities")
    if spec.get("uid") is not None:
        if spec.get("max_pids"):
            limit_processes(int(spec["max_pids"]))  # counts our uid's processes: this session's alone
            applied.append("nproc")
        if not (prebuilt and prebuilt.capabilities_dropped):
            drop_capabilities(prebuilt.last_cap if prebuilt else None)
        drop_to_uid(int(spec["uid"]), int(spec["gid"]))
        applied += ["capabilities", "uid"]
    if spec.get("no_new_privs", True) or spec.get("landlock") or spec.get("seccomp"):
        set_no_new_privs()
        applied.append("no_new_privs")
    network = spec.get("network", True)
    if spec.get("landlock"):
        _landlock(spec, prebuilt, network)
        applied.append("landlock")
    if spec.get("seccomp"):
        seccomp = prebuilt.seccomp.get(network) if prebuilt else None
        seccomp.install() if seccomp else apply_seccomp(network=network)
        applied.append("seccomp")
    return applied


def _landlock(spec: dict, prebuilt: Prebuilt | None, network: bool) -> None:
    """Landlock from the zygote's rules plus the session's temp dir, or built here when there are none."""
    rules = prebuilt.landlock if prebuilt else None
    if rules is None:
        apply_landlock(int(spec["landlock"]), spec.get("read_paths", ()), spec.get("write_paths", ()), network=network)
        return
    fd = os.open(spec["tmpdir"], os.O_PATH | os.O_CLOEXEC) if spec.get("tmpdir") else None
    try:
        rules.restrict(network=network, extra=None if fd is None else struct.pack("=Qi", rules.writable, fd))
    finally:
        if fd is not None:
            os.close(fd)
        rules.close()
