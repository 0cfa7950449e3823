"""An unprivileged server's agents in a user + pid namespace of the zygote's (docs/security.md).

The zygote's steps alone as the unprivileged test user, the start-up probe and what ``strict`` makes of
it, then a real ``corral serve`` run as that user: a hostile agent's setsid'ed grandchild dies with a
SIGKILLed server, agents hold no capability and cannot make a user namespace, and they still join
their cgroups. Skips say which kernel feature (or which unreadable Python) is missing.
"""

import asyncio
import ctypes
import os
import shutil
import signal
import sys
import tempfile

import psutil
import pytest

from corral.agent_proc import sandbox as layers
from corral.agent_proc import userns
from corral.supervisor import cgroupfs
from corral.supervisor import sandbox_plan as policy
from tests.chaos_kit import call, client_session
from tests.procs import CORRAL_MAIN, start_server, wait_gone
from tests.test_sandbox import ROOT, attempt, in_child, shared_dir, unprivileged_uid  # noqa: F401  fixtures
from tests.unprivileged_kit import REPO, NoPython, gid_of, serve_as_user, user_python

CAP_FIELDS = ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")
LIBC = ctypes.CDLL(None, use_errno=True)


def as_user(fn, uid: int):
    """Run ``fn`` in a forked child that became ``uid`` as a server started as that user would be.

    A process that left root by setresuid is not dumpable, so its /proc/self files stay root's and
    it cannot write its own id maps; one started by exec as the user is dumpable.
    """
    def dumpable_then_fn():
        LIBC.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        return fn()

    return in_child(dumpable_then_fn, uid=uid)


@pytest.fixture(scope="module")
def user_namespaces(unprivileged_uid):
    """Skip unless the unprivileged user may make a user and a pid namespace here (the probe says why not)."""
    why_not = as_user(userns.probe, unprivileged_uid)
    if why_not is not None:
        pytest.skip(f"no user namespace for an unprivileged user here: {why_not}")


@pytest.fixture(scope="module")
def python_for_user(unprivileged_uid):
    """A python the unprivileged user can run corral with, or skip saying why there is none."""
    parent = tempfile.mkdtemp(prefix="corral-userns-py-")
    os.chmod(parent, 0o755)
    try:
        yield user_python(unprivileged_uid, parent)
    except NoPython as exc:
        pytest.skip(str(exc))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def own_status() -> dict:
    """This process's capability sets (from /proc/self/status), its innermost pid and its ids."""
    status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
    return {**{k: int(status[k], 16) for k in CAP_FIELDS}, "ns_pid": int(status["NSpid"].split()[-1]),
            "uid": os.getresuid(), "gid": os.getresgid()}


# ---------------------------------------------------------------- the zygote's steps alone


def unshare_user_namespace() -> None:
    """unshare(CLONE_NEWUSER), raising OSError when refused."""
    if LIBC.unshare(userns.CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_the_zygote_steps_leave_agents_no_capability_and_no_way_to_a_user_namespace(user_namespaces, unprivileged_uid):
    def agent():
        """What a child forked after the zygote's steps has, and what seccomp leaves it."""
        made_before = in_child(lambda: attempt(unshare_user_namespace))  # in a throwaway child: the control
        layers.set_no_new_privs()
        layers.apply_seccomp()
        return {**own_status(), "own user namespace before seccomp": made_before,
                "own user namespace after": attempt(unshare_user_namespace)}

    def zygote():
        ids = os.getresuid(), os.getresgid()
        userns.enter_user_namespace()
        given = own_status()
        layers.unshare_pid_namespace()
        userns.drop_every_capability()
        return {"ids kept": (given["uid"], given["gid"]) == ids, "given": given["CapEff"] != 0,
                "zygote": {k: v for k, v in own_status().items() if k in CAP_FIELDS}, "agent": in_child(agent)}

    out = as_user(zygote, unprivileged_uid)
    none = dict.fromkeys(CAP_FIELDS, 0)
    assert out["ids kept"] and out["given"]  # the new namespace did give capabilities: the drop is real
    assert out["zygote"] == none
    agent_out = out["agent"]
    assert {k: agent_out[k] for k in CAP_FIELDS} == none
    assert agent_out["ns_pid"] == 1  # the first process forked into the new pid namespace is its init
    assert (agent_out["own user namespace before seccomp"], agent_out["own user namespace after"]) == ("ok", "EPERM")


# ---------------------------------------------------------------- the probe and strict


def test_an_unprivileged_host_reports_the_user_namespace_and_strict_demands_it(user_namespaces, unprivileged_uid):
    def policies():
        out = {"expected": policy.expected_layers(root=False)}
        sb = policy.choose_sandbox("auto")
        out["auto in force"] = {name: sb.layers[name]["in_force"] for name in ("user_namespace", "capabilities", "pid_namespace")}
        out["options"] = sb.zygote_options()["user_namespace"]
        sb.close()
        userns.probe = lambda: "user namespaces are off for unprivileged users (sysctl user.max_user_namespaces = 0)"
        try:
            policy.choose_sandbox("strict")
        except policy.SandboxRefused as exc:
            out["refused"] = str(exc)
        auto = policy.choose_sandbox("auto")
        out["auto"] = {name: auto.layers[name] for name in ("user_namespace", "pid_namespace")}
        out["auto options"] = auto.zygote_options()["user_namespace"], auto.zygote_options()["pid_namespace"]
        auto.close()
        return out

    out = as_user(policies, unprivileged_uid)
    assert {"user_namespace", "capabilities", "pid_namespace"} <= set(out["expected"])  # what strict demands
    assert out["auto in force"] == {"user_namespace": True, "capabilities": True, "pid_namespace": True}
    assert out["options"] is True
    assert "user_namespace (user namespaces are off for unprivileged users (sysctl user.max_user_namespaces = 0))" in out["refused"]
    assert out["auto"]["user_namespace"] == {"in_force": False, "reason": "user namespaces are off for unprivileged "
                                             "users (sysctl user.max_user_namespaces = 0)"}
    assert not out["auto"]["pid_namespace"]["in_force"] and out["auto options"] == (False, False)


def test_the_probe_says_a_seccomp_filter_refuses_the_user_namespace(user_namespaces, unprivileged_uid):
    """As under a container runtime's seccomp profile: the sysctls allow it, the unshare is refused."""
    def under_seccomp():
        layers.set_no_new_privs()
        layers.apply_seccomp()
        return userns.probe()

    assert as_user(under_seccomp, unprivileged_uid) == (
        "unshare(CLONE_NEWUSER): Operation not permitted (a container's seccomp profile or a security module refuses it?)")


def test_a_root_server_needs_no_user_namespace():
    if not ROOT:
        pytest.skip("needs root")
    sb = policy.choose_sandbox("auto")
    try:
        assert "user_namespace" not in sb.layers and sb.zygote_options()["user_namespace"] is False
        assert "user_namespace" not in policy.expected_layers(root=True)
    finally:
        sb.close()


# ---------------------------------------------------------------- a real server as the unprivileged user


async def mcp(http, url: str, sid: str, command: str, **args) -> dict:
    """Run an agent command in session ``sid``; its result."""
    status, body = await call(http, "POST", url + "/api/mcp-command", json={"command": command, "args": args, "session_id": sid})
    assert status == 200, body
    return body["result"]


def cap_sets(pid: int) -> dict:
    """A process's capability sets, from its /proc status."""
    status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")}


def in_agents_namespace(server_pid: int) -> list[int]:
    """Every descendant of the server in another pid namespace than the server's: the agents' init, agents, theirs."""
    own = os.readlink(f"/proc/{server_pid}/ns/pid")
    return [p.pid for p in psutil.Process(server_pid).children(recursive=True)
            if os.readlink(f"/proc/{p.pid}/ns/pid") != own]


async def test_nothing_an_unprivileged_session_started_outlives_a_sigkilled_server(
        user_namespaces, unprivileged_uid, python_for_user, shared_dir):
    home = shared_dir / "server"
    home.mkdir()
    proc, url = await asyncio.to_thread(serve_as_user, unprivileged_uid, python_for_user, home,
                                        "--agent", "tests.agents.hostile:Escaper", "--agent-disk", "4M")
    try:
        async with client_session() as http:
            _, health = await call(http, "GET", url + "/health")
            sandbox = health["sandbox"]["layers"]
            assert {name: sandbox[name]["in_force"] for name in ("uid", "user_namespace", "capabilities", "pid_namespace", "disk")} == {
                "uid": False, "user_namespace": True, "capabilities": True, "pid_namespace": True, "disk": True}, sandbox
            for sid in ("a", "b"):
                assert (await mcp(http, url, sid, "attack", what="escape_tree"))["escaped"]
            # the disk layer unprivileged: the tmpfs the zygote mounted in its user namespace bounds the agent
            filled = await mcp(http, url, "a", "attack", what="fill", most=8 * 1024 * 1024)
            held = await mcp(http, url, "a", "privileges")
            made = await mcp(http, url, "a", "attack", what="new_user_namespace")
        zygote = health["zygote_pid"]
        assert os.readlink(f"/proc/{zygote}/ns/user") != os.readlink(f"/proc/{proc.pid}/ns/user")
        gid = gid_of(unprivileged_uid)
        assert held["ids"][:2] == [[unprivileged_uid] * 3, [gid] * 3]  # the server's, mapped to themselves
        assert held["ids"][2] == [] or not ROOT  # started by root without supplementary groups
        assert {k: held[k] for k in ("effective", "permitted", "inheritable", "bounding", "ambient")} == {
            "effective": 0, "permitted": 0, "inheritable": 0, "bounding": [], "ambient": []}
        assert (held["no_new_privs"], held["seccomp"]) == (1, 2)  # SECCOMP_MODE_FILTER
        assert not made["escaped"] and "unshare: Operation not permitted; clone: Operation not permitted" in made["detail"], made
        assert not filled["escaped"] and "No space left on device after 4194304 bytes" in filled["detail"], filled
        assert len(in_agents_namespace(proc.pid)) == 5  # the namespace's init, two agents, two setsid'ed grandchildren
        # what the zygote kept of its user namespace's capabilities (to mount each agent's tmpfs): that one, no other;
        # the init, the agents and theirs: none
        assert cap_sets(zygote) == {"CapEff": 1 << 21, "CapPrm": 1 << 21, "CapInh": 0, "CapBnd": 0, "CapAmb": 0}
        assert {pid: cap_sets(pid)["CapEff"] | cap_sets(pid)["CapPrm"] for pid in in_agents_namespace(proc.pid)} == dict.fromkeys(
            in_agents_namespace(proc.pid), 0)
        started = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert await asyncio.to_thread(wait_gone, started, 5.0) == []  # the zygote, the init, every agent and theirs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def delegated_v1_cgroups(uid: int, name: str) -> dict[str, str]:
    """A memory and a pids cgroup v1 dir the user owns (as a delegating admin would make); skip where there are none."""
    roots = {ctrl: f"/sys/fs/cgroup/{ctrl}" for ctrl in ("memory", "pids")}
    if not ROOT or not all(os.path.exists(os.path.join(r, "tasks")) for r in roots.values()):
        pytest.skip("needs root and cgroup v1 memory and pids hierarchies to delegate (this test is for v1)")
    made = {}
    for ctrl, root in roots.items():
        path = os.path.join(root, name)
        os.mkdir(path)
        made[ctrl] = path
        for entry in (path, os.path.join(path, "cgroup.procs"), os.path.join(path, "tasks")):
            os.chown(entry, uid, uid)
    return made


def remove_cgroup_tree(path: str) -> None:
    """rmdir a cgroup and every cgroup below it, deepest first."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda walked: -walked[0].count("/")):
        cgroupfs.rmdir_retry(dirpath)


async def test_agents_in_the_user_namespace_join_their_cgroups(user_namespaces, unprivileged_uid, python_for_user, shared_dir):
    """The agent writes its own pid into its cgroup's cgroup.procs: from inside the user namespace, with no capability."""
    cgroups = delegated_v1_cgroups(unprivileged_uid, f"corral-userns-test-{os.getpid()}")
    home = shared_dir / "server"
    home.mkdir()
    join = "; ".join(f"open({os.path.join(p, 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))"
                     for p in cgroups.values())
    proc = None
    try:
        proc, url = await asyncio.to_thread(serve_as_user, unprivileged_uid, python_for_user, home,
                                            "--agent", "tests.agents.hostile:Escaper", "--memory-limit", "256M",
                                            "--max-pids", "32", prelude=join)
        async with client_session() as http:
            _, health = await call(http, "GET", url + "/health")
            assert (health["limit"]["mechanism"], health["limit"]["pids"]["mechanism"]) == ("cgroup1", "cgroup1"), health["limit"]
            assert health["sandbox"]["layers"]["user_namespace"]["in_force"]
            assert (await mcp(http, url, "c", "attack", what="tmp"))["escaped"]  # the control: it runs
            _, info = await call(http, "GET", url + "/admin/sessions/c")
        agent = info["pid"]
        joined = {line.split(":")[1]: line.split(":")[2] for line in open(f"/proc/{agent}/cgroup").read().splitlines()}
        for ctrl, path in cgroups.items():
            mine = joined[ctrl]
            assert mine.startswith(f"/{os.path.basename(path)}/corral-") and mine.count("/") == 3, (ctrl, mine)
        leaf = os.path.join("/sys/fs/cgroup/memory", joined["memory"].lstrip("/"))
        assert cgroupfs.read_int(os.path.join(leaf, "memory.limit_in_bytes")) == 256 * 1024 * 1024
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        for path in cgroups.values():
            remove_cgroup_tree(path)


async def test_root_without_cap_sys_admin_reports_no_pid_namespace_and_its_agents_still_run(tmp_path):
    # the root of a container with the default capability set: no CAP_SYS_ADMIN, so no unshare(CLONE_NEWPID)
    if not ROOT:
        pytest.skip("needs root (the container's root is what is imitated)")
    prelude = "from tests.unprivileged_kit import drop_capability; drop_capability(21)"  # CAP_SYS_ADMIN
    proc, url = await asyncio.to_thread(start_server, tmp_path, program=[sys.executable, "-c", f"{prelude}; {CORRAL_MAIN[-1]}"],
                                        cwd=REPO)
    try:
        async with client_session() as http:
            _, health = await call(http, "GET", url + "/health")
            row = health["sandbox"]["layers"]["pid_namespace"]
            assert not row["in_force"] and "CLONE_NEWPID" in row["reason"], row
            assert health["sandbox"]["layers"]["uid"]["in_force"]
            status, body = await call(http, "POST", url + "/api/chat", json={"message": "my name is Ada", "session_id": "c"})
            assert status == 200 and body["reply"] == "Got it: your name is Ada.", body
    finally:
        proc.terminate()
        proc.wait()
