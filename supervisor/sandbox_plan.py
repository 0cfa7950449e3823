"""Which sandbox layers this host gives agents, and the per-session parts (uid, temp dir).

Picked once at start, like the memory limiter: ``choose_sandbox`` probes the host and says for
each layer whether it is in force and, if not, why. ``prepare`` hands out one session's spec
(its own uid from the range, its own temp dir) for ``agent_proc.sandbox.confine`` in the forked
child; ``release`` takes them back after the process has exited (the temp dir on the remover's
thread, supervisor/tree_removal.py). No web imports.
"""
from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import sys
import time
from collections import deque

from corral.agent_proc import disk as disk_bound
from corral.agent_proc import netns, userns
from corral.agent_proc import sandbox as layers
from corral.supervisor.agent_tmp import make_tree, release_tree
from corral.supervisor.tree_removal import Remover
from corral.supervisor.uid_claims import CLAIMS_DIR, UidClaims, claims_dir_problem

__all__ = ["Sandbox", "SandboxRefused", "choose_sandbox", "parse_uid_range", "MODES", "DEFAULT_UID_RANGE"]

MODES = ("auto", "strict", "off")
NETWORK_MODES = ("proxy", "host", "off")
DEFAULT_UID_RANGE = range(60000, 61000)
_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
# Landlock ABI with everything the design relies on: scoped signals and abstract sockets (6).
FULL_LANDLOCK_ABI = 6
# Outside the Python installation, what an agent may read: libraries, and what name resolution,
# TLS and time zones need. Deliberately not /etc as a whole (a tenants file may live there),
# nor /proc (other processes) or /home.
SYSTEM_READ_PATHS = (
    "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin",
    "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/resolv.conf", "/etc/hosts", "/etc/host.conf",
    "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols", "/etc/localtime",
    "/etc/ld.so.cache", "/etc/mime.types", "/etc/passwd", "/etc/group",
    "/dev/urandom", "/dev/random",
)
DEVICE_WRITE_PATHS = ("/dev/null", "/dev/zero", "/dev/full")
CLOSE_TIMEOUT = 10.0  # seconds a stop spends removing temp dirs; what is left, the next start sweeps


class SandboxRefused(RuntimeError):
    """``--sandbox strict`` and a layer the host should have is missing."""


def parse_uid_range(text) -> range:
    """Parse "60000-60999" into the range of uids (inclusive), each a session's own."""
    if isinstance(text, range):
        return text
    m = _RANGE_RE.match(str(text))
    if not m or int(m[1]) < 1 or int(m[2]) < int(m[1]) or int(m[2]) >= 2**31:
        raise ValueError(f"invalid uid range {text!r}: expected FIRST-LAST, e.g. 60000-60999 (not 0)")
    return range(int(m[1]), int(m[2]) + 1)


class Sandbox:
    """The layers in force on this host, and the pool of per-session uids and temp dirs."""

    def __init__(self, mode: str, layer_table: dict, *, read_paths=(), network: bool = True,
                 network_mode: str = "host", uids=(), tmp_parent: str | None = None, tmp_lock: int | None = None,
                 max_pids: int = 0, max_open_files: int = 0, uid_claims: UidClaims | None = None,
                 disk: int = 0):
        self.mode = mode
        self.layers = layer_table  # name -> {"in_force": bool, "detail"/"reason": str}
        self.read_paths = list(read_paths)
        self.network = network
        # proxy: the agents' own network namespace and the egress gateway (in force only where the
        # "network" layer is); host: the host's; off: no TCP/UDP at all
        self.network_mode = network_mode if network_mode != "proxy" or self.on("network") else "host"
        self.free_uids: deque[int] = deque(uids)
        self.uid_count = len(self.free_uids)
        self.uid_claims = uid_claims  # host-wide: another server's sessions may hold some of our range
        self.tmp_parent = tmp_parent
        self.tmp_lock = tmp_lock  # the fd of the flock that says the tree's server is alive (agent_tmp.py)
        self.max_pids = max_pids
        self.max_open_files = max_open_files
        self.disk = disk  # bytes of each session's TMPDIR (a tmpfs the zygote mounts), when the layer is in force
        self.dropped_paths: list[str] = []
        self.notes: list[str] = []
        self.remover = Remover()  # temp dirs go on a thread of their own: a session's end never waits for one
        # not a layer, but the zygote's one other choice made once before it forks (--immortal-heap,
        # agent_proc/immortal.py), so it travels with the layers' options, in every sandbox mode
        self.immortal_heap = "auto"

    def on(self, layer: str) -> bool:
        """Whether a layer is in force."""
        return bool(self.layers.get(layer, {}).get("in_force"))

    def describe(self, gateway: str | None = None) -> dict:
        """What /health (admin) and the start-up log show; ``gateway``: where agents reach the egress gateway."""
        layers_shown = self.layers
        if "network" in self.layers:
            layers_shown = {**self.layers, "network": {**self.layers["network"], "mode": self.network_mode,
                                                      "gateway": gateway}}
        return {"mode": self.mode, "layers": layers_shown, "network": self.network, "network_mode": self.network_mode,
                "uids_free": len(self.free_uids) if self.on("uid") else None,
                "notes": self.notes}

    # The zygote builds the Landlock rules and seccomp filters once (agent_proc.sandbox.Prebuilt);
    # bench.sandbox turns it off to measure what that saves.
    prebuild = True

    def zygote_options(self) -> dict:
        """What the zygote does once: the agents' pid namespace (in a user namespace unless root), a subreaper, the prebuilt layers."""
        options = {"pid_namespace": self.on("pid_namespace"), "user_namespace": self.on("user_namespace"),
                   "net_namespace": self.network_mode == "proxy", "subreaper": self.mode != "off",
                   "mount_namespace": self.on("disk"), "own_uid": self.on("uid"), "immortal_heap": self.immortal_heap}
        if self.mode != "off" and self.prebuild:
            options.update(prebuild=True, landlock=self._landlock_abi(), read_paths=self.read_paths,
                           device_paths=list(DEVICE_WRITE_PATHS), seccomp=self.on("seccomp"),
                           tmp_parent=self.tmp_parent, bounding_set=self.on("uid"))
        return options

    def _landlock_abi(self) -> int:
        """The Landlock ABI in force, 0 without it."""
        return self.layers["landlock"].get("abi", 0) if self.on("landlock") else 0

    def prepare(self, key: str) -> dict:
        """One session's spec for ``confine``: its uid, its temp dir, the layers; raises OSError when out of uids."""
        if self.mode == "off":
            return {"no_new_privs": False}
        uid = self._take_uid() if self.on("uid") else None
        tmpdir = os.path.join(self.tmp_parent, key)
        try:
            os.mkdir(tmpdir, 0o700)
            if uid is not None:
                os.chown(tmpdir, uid, uid)
        except OSError:
            if uid is not None:
                self._give_back(uid)
            raise
        return {
            "uid": uid, "gid": uid, "tmpdir": tmpdir, "network": self.network,
            "no_new_privs": True,
            "landlock": self._landlock_abi(),
            # with the zygote's prebuilt rules, the child adds only its temp dir: no path list per spawn
            **({} if self.prebuild else {"read_paths": self.read_paths, "write_paths": [tmpdir, *DEVICE_WRITE_PATHS]}),
            "seccomp": self.on("seccomp"),
            "max_pids": self.max_pids if self.on("uid") else 0,
            "max_open_files": self.max_open_files,
            **({"disk": self.disk, "clear_capabilities": uid is None} if self.on("disk") else {}),
        }

    def release(self, spec) -> None:
        """After the process is gone: give its uid back and queue its temp dir's removal; never raises or waits.

        The dir is the server's (0700) before its uid can be handed out again: if its removal is slow or
        fails, the next session of that uid cannot reach what is left.
        """
        if not isinstance(spec, dict):
            return
        if spec.get("tmpdir"):
            if spec.get("uid") is not None:
                with contextlib.suppress(OSError):  # the path is ours: the agent could change its mode, not replace it
                    os.chown(spec["tmpdir"], os.geteuid(), os.getegid(), follow_symlinks=False)
                    os.chmod(spec["tmpdir"], 0o700)
            self.remover.submit(spec["tmpdir"])
        if spec.get("uid") is not None:
            self._give_back(spec["uid"])

    def _take_uid(self) -> int:
        """A uid no live session on this host has (ours, or another server's); OSError when there is none."""
        for _ in range(len(self.free_uids)):
            uid = self.free_uids.popleft()
            if self.uid_claims is None or self.uid_claims.claim(uid):
                return uid
            self.free_uids.append(uid)  # another server's session has it: try the next
        raise OSError(errno.EUSERS, f"every sandbox uid ({self.uid_count}) is in use by a live session (of this "
                      "server or, with the same --sandbox-uid-range, of another on this host)")

    def _give_back(self, uid: int) -> None:
        """Free a uid: to the back of the queue, so the longest-free uid is reused first."""
        if self.uid_claims is not None:
            self.uid_claims.release(uid)
        self.free_uids.append(uid)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> dict | None:
        """Remove the temp dirs (within ``timeout`` s in all; blocking: call it off the loop), then let the
        tree's lock go, and the uids' claims; what the tree's removal did."""
        if self.uid_claims is not None:
            self.uid_claims.close()
        deadline = time.monotonic() + timeout
        self.remover.close(timeout / 2)
        if not self.tmp_parent:
            return None
        removal = release_tree(self.tmp_parent, self.tmp_lock, timeout=max(0.0, deadline - time.monotonic()))
        self.tmp_parent = self.tmp_lock = None
        return removal


def python_read_paths() -> list[str]:
    """The Python installation and every import path: what an agent must be able to read."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(os.path.realpath(p) for p in paths)


def _contains(outer: str, inner: str) -> bool:
    """Whether path ``inner`` is ``outer`` or beneath it."""
    outer, inner = os.path.realpath(outer), os.path.realpath(inner)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def safe_read_paths(candidates, protected) -> tuple[list[str], list[str]]:
    """Split read paths into (allowed, dropped): a path holding a protected one (data dir, tenants file,
    run dir, the temp dirs' parent) is dropped, since Landlock cannot carve a hole in an allowed tree."""
    allowed, dropped = [], []
    for path in candidates:
        if any(_contains(path, p) for p in protected if p):
            dropped.append(path)
        else:
            allowed.append(path)
    return allowed, dropped


def unreadable_for_others(paths) -> list[str]:
    """Paths a uid other than their owner (and not in their group) cannot reach: a dir on the way lacks o+x."""
    bad = []
    for path in paths:
        probe = os.path.realpath(path)
        while True:
            try:
                mode = os.stat(probe).st_mode
            except OSError:
                break
            if not mode & 0o001:
                bad.append(f"{path} (at {probe})")
                break
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
    return bad


def _free_uids(uid_range: range) -> tuple[list[int], int]:
    """The uids (and same-numbered gids) of the range that no user or group on the host has."""
    taken = {u.pw_uid for u in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    free = [u for u in uid_range if u not in taken]
    return free, len(uid_range) - len(free)


def _layer(in_force: bool, detail: str) -> dict:
    """One row of the layer table."""
    return {"in_force": in_force, ("detail" if in_force else "reason"): detail}


def _network_layer(mode: str, root: bool, user_namespace: bool) -> dict:
    """The network row: the agents' own namespace (tried in a child), or what the mode leaves them."""
    if mode == "off":
        return _layer(True, "--agent-network off: TCP and UDP refused (Landlock, seccomp)")
    if mode == "host":
        return _layer(False, "--agent-network host: agents share the host's network (its loopback services, "
                             "the cloud metadata address, its ports)")
    if not root and not user_namespace:
        return _layer(False, "needs root or a user namespace to make the agents' network namespace")
    steps = (netns.enter_network_namespace,) if root else (userns.enter_user_namespace, netns.enter_network_namespace)
    failure = userns.try_in_child(*steps)
    if failure is not None:
        return _layer(False, f"unshare(CLONE_NEWNET) refused: {failure}; agents use the host's network")
    return _layer(True, "one network namespace for every agent, only lo; out only through the egress gateway")


def probe_layers(*, root: bool, network: bool, uid_range: range, network_mode: str | None = None,
                 disk: int = 0) -> dict:
    """Which layers this host supports, with the reason for each missing one."""
    table = {}
    table["uid"] = _layer(root, f"one uid per live session from {uid_range.start}-{uid_range.stop - 1}"
                          if root else "not running as root: agents share the server's uid")
    if root:
        table["capabilities"] = _layer(True, "bounding and ambient sets emptied; none after the uid drop")
        table["pid_namespace"] = _root_pid_namespace()
    else:
        table.update(_unprivileged_namespaces())
    table["no_new_privs"] = _layer(True, "prctl(PR_SET_NO_NEW_PRIVS)")
    abi = layers.landlock_abi()
    if abi:
        parts = ["filesystem"] + (["tcp"] if abi >= 4 else []) + (["signal and abstract-socket scoping"] if abi >= 6 else [])
        table["landlock"] = {**_layer(True, f"ABI {abi}: {', '.join(parts)}"), "abi": abi}
        if abi < FULL_LANDLOCK_ABI:
            table["landlock_scope"] = _layer(False, f"Landlock ABI {abi} < 6: signals and abstract sockets not scoped")
        else:
            table["landlock_scope"] = _layer(True, "signals and abstract unix sockets stay inside the session")
    else:
        table["landlock"] = _layer(False, "the kernel has no Landlock (needs >= 5.13 with lsm=landlock)")
        table["landlock_scope"] = _layer(False, "no Landlock")
    if layers.AUDIT_ARCH is None:
        table["seccomp"] = _layer(False, f"no syscall table for {layers.MACHINE}")
    elif not _kernel_has_seccomp():
        table["seccomp"] = _layer(False, "the kernel has no seccomp filter support")
    else:
        table["seccomp"] = _layer(True, f"{len(layers.DENIED_SYSCALLS)} syscalls refused (io_uring among them), "
                                  "namespaced clone refused, "
                                  + ("inet sockets only" if network else "no sockets but socketpair")
                                  + ", no executable memfd, no execveat of a descriptor")
    table["tmpdir"] = _layer(True, "a private TMPDIR per session, removed when its process ends")
    table["disk"] = _disk_layer(root, disk, user_namespace=table.get("user_namespace", {}).get("in_force", False))
    if table["disk"]["in_force"] and not root:
        table["capabilities"] = _layer(True, "the zygote keeps only CAP_SYS_ADMIN of its own user namespace (to mount "
                                             "each agent's tmpfs); the namespace's init and every agent clear every set")
    mode = network_mode or ("host" if network else "off")
    table["network"] = _network_layer(mode, root, bool(table.get("user_namespace", {}).get("in_force")))
    return table


def _disk_layer(root: bool, size: int, *, user_namespace: bool) -> dict:
    """The disk row: a size-limited tmpfs per session TMPDIR in the zygote's mount namespace (probed in a child)."""
    if not size:
        return _layer(False, "--agent-disk 0: an agent's TMPDIR is bounded only by the host's disk")
    if not (root or user_namespace):
        return _layer(False, "not root and no user namespace: the zygote may not mount a tmpfs per session")
    failure = disk_bound.probe(in_user_namespace=not root)
    if failure is not None:
        return _layer(False, f"cannot mount a tmpfs in a mount namespace of the zygote's own: {failure}")
    return _layer(True, f"each TMPDIR a tmpfs of {size} bytes and {disk_bound.inodes_for(size)} inodes (noexec, "
                        "0700), in the zygote's own mount namespace; ENOSPC past it, gone with the unmount")


def _root_pid_namespace() -> dict:
    """The pid_namespace row as root, tried in a child: a container may leave root without CAP_SYS_ADMIN."""
    failure = userns.try_in_child(layers.unshare_pid_namespace)
    if failure is not None:
        return _layer(False, f"unshare(CLONE_NEWPID) refused: {failure} (a container without CAP_SYS_ADMIN, "
                             "or its seccomp profile?)")
    return _layer(True, "every agent in one pid namespace whose init dies with the zygote")


def _unprivileged_namespaces() -> dict:
    """The user_namespace, capabilities and pid_namespace rows for a server that is not root (probed)."""
    why_not = userns.probe()
    if why_not is not None:
        return {"user_namespace": _layer(False, why_not),
                "capabilities": _layer(False, "not running as root and no user namespace: there are none to drop"),
                "pid_namespace": _layer(False, f"needs root or a user namespace ({why_not})")}
    return {
        "user_namespace": _layer(True, "the zygote's own: the server's uid and gid mapped to themselves, setgroups "
                                       "denied; made once, before the first agent"),
        "capabilities": _layer(True, "the zygote drops every one its user namespace gave it before forking: "
                                     "agents hold none"),
        "pid_namespace": _layer(True, "every agent in one pid namespace (in the zygote's user namespace) whose "
                                      "init dies with the zygote"),
    }


def _kernel_has_seccomp() -> bool:
    """Whether /proc/self/status reports a Seccomp field (CONFIG_SECCOMP)."""
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def expected_layers(root: bool, network_mode: str = "host", *, disk: bool = False) -> list[str]:
    """What ``strict`` demands: everything a host of this kind (root or not) should give.

    A server that is not root needs a user namespace for its pid namespace: demanded wherever the
    kernel is built with them, even if a sysctl or a container's seccomp turns them off. The disk
    bound (when ``--agent-disk`` asks for one) is demanded wherever those namespaces are.
    """
    base = ["no_new_privs", "landlock", "landlock_scope", "seccomp", "tmpdir"]
    if network_mode == "proxy":
        base.append("network")
    if root:
        return ["uid", "capabilities", "pid_namespace"] + base + (["disk"] if disk else [])
    if userns.kernel_has_user_namespaces():
        return ["user_namespace", "capabilities", "pid_namespace"] + base + (["disk"] if disk else [])
    return base


def choose_sandbox(mode: str, *, protected=(), network: bool = True, network_mode: str | None = None, uid_range: range = DEFAULT_UID_RANGE,
                   max_pids: int = 0, max_open_files: int = 0, run_id: str = "run",
                   claims_dir: str = CLAIMS_DIR, disk: int = 0) -> Sandbox:
    """Probe the host and build the sandbox for this run; raises SandboxRefused under ``strict``."""
    if mode not in MODES:
        raise ValueError(f"sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return Sandbox("off", {})
    root = os.geteuid() == 0
    network_mode = network_mode or ("host" if network else "off")
    network = network_mode != "off"
    table = probe_layers(root=root, network=network, uid_range=uid_range, network_mode=network_mode, disk=disk)
    uids: list[int] = []
    notes = []
    uid_claims = None
    if root:
        uids, taken = _free_uids(uid_range)
        if taken:
            notes.append(f"{taken} uids of the range belong to existing users or groups and are not used")
        if not uids:
            table["uid"] = _layer(False, f"every uid in {uid_range.start}-{uid_range.stop - 1} belongs to a user or group")
        problem = claims_dir_problem(claims_dir)
        if problem is None:
            uid_claims = UidClaims(claims_dir)
        else:
            notes.append(f"uids are not claimed host-wide ({problem}): give every server on this host "
                         "its own --sandbox-uid-range")
    missing = [name for name in expected_layers(root, network_mode, disk=bool(disk)) if not table[name]["in_force"]]
    if mode == "strict" and missing:
        raise SandboxRefused("--sandbox strict: missing " + "; ".join(f"{n} ({table[n]['reason']})" for n in missing))
    tmp_parent, tmp_lock = make_tree(run_id)
    read_paths, dropped = safe_read_paths(python_read_paths() + list(SYSTEM_READ_PATHS), [*protected, tmp_parent])
    sandbox = Sandbox(mode, table, read_paths=read_paths, network=network, network_mode=network_mode, uids=uids,
                      tmp_parent=tmp_parent, tmp_lock=tmp_lock, max_pids=max_pids, max_open_files=max_open_files,
                      uid_claims=uid_claims, disk=disk)
    sandbox.dropped_paths = dropped
    if dropped:
        notes.append("not readable by agents, as they hold corral's own files: " + ", ".join(dropped))
    if table["uid"]["in_force"]:
        unreadable = unreadable_for_others(python_read_paths())
        if unreadable:
            notes.append("the agents' uids cannot read " + ", ".join(unreadable)
                         + ": only modules imported before the fork (by the agent's module) can be used; "
                         "make the installation world-readable to import more at run time (docs/security.md)")
    sandbox.notes = notes
    return sandbox
