"""Tests for per-session memory limits: fake cgroup trees for the file logic, the real host for the rest."""
from __future__ import annotations

import ctypes
import os
import signal
import time
import uuid

import pytest

from corral.agent_proc.limits import OOM_EXIT_CODE, LimitSpec, apply_limits
from corral.supervisor.limit_plan import (
    Cgroup1Limiter, Cgroup2Limiter, NoLimiter, RlimitLimiter, choose_limiter, parse_cores, parse_size,
    process_start_time, run_dir_name,
)

MiB = 1 << 20
RUN = run_dir_name("r1")  # what _choose names this process's per-run cgroup


# ---------------------------------------------------------------------------------------------
# helpers

def _put(path, text=""):
    """Create a file (and its parents) in a fake cgroup tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _fork(body):
    """Fork a child that runs body() and exits with its return value (1 on any exception)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = body() or 0
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid):
    """waitpid and return the raw status."""
    return os.waitpid(pid, 0)[1]


def _hog(spec, nbytes):
    """Child body: confine ourselves, then allocate and touch nbytes; MemoryError -> OOM_EXIT_CODE."""
    def body():
        apply_limits(spec)
        try:
            block = bytearray(b"\x01") * nbytes  # the repeat writes every page
        except MemoryError:
            return OOM_EXIT_CODE
        return 0 if len(block) == nbytes else 2
    return body


@pytest.fixture
def fake_v2(tmp_path):
    """A pure cgroup2 tree with the memory controller delegated to our cgroup /svc (holding our pid)."""
    root = tmp_path / "v2"
    _put(root / "cgroup.controllers", "cpu io memory pids\n")
    _put(root / "svc" / "cgroup.controllers", "memory pids\n")
    _put(root / "svc" / "cgroup.procs", f"{os.getpid()}\n")
    _put(root / "svc" / "cgroup.subtree_control", "")
    proc = _put(tmp_path / "proc_self_cgroup", "0::/svc\n")
    return {"v2_root": str(root), "v1_root": str(tmp_path / "no-v1"), "proc_self_cgroup": str(proc),
            "own": root / "svc"}


@pytest.fixture
def fake_v1(tmp_path):
    """A cgroup v1 memory hierarchy with our memory cgroup at /a/b and no pure v2 mount."""
    root = tmp_path / "v1"
    _put(root / "memory.usage_in_bytes", "0\n")
    (root / "a" / "b").mkdir(parents=True)
    proc = _put(tmp_path / "proc_self_cgroup", "5:cpu,cpuacct:/x\n4:memory:/a/b\n0::/\n")
    return {"v2_root": str(tmp_path / "tmpfs"), "v1_root": str(root), "proc_self_cgroup": str(proc),
            "own": root / "a" / "b"}


def _choose(tree, limit=64 * MiB, **kw):
    """choose_limiter against a fake tree."""
    args = {k: tree[k] for k in ("v2_root", "v1_root", "proc_self_cgroup")}
    return choose_limiter(limit, run_id="r1", **args, **kw)


# ---------------------------------------------------------------------------------------------
# parse_size

@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * MiB), ("1G", 1 << 30), ("512MiB", 512 * MiB), ("1.5G", 3 << 29),
    ("1048576", 1048576), (0, 0), ("0", 0), (4096, 4096), ("64k", 64 << 10), ("2 GB", 2 << 30),
    ("1T", 1 << 40), (" 100b ", 100), ("none", 0), ("512mib", 512 * MiB),
])
def test_parse_size_ok(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "12X", "-1", "1.2.3G", "M", -5, True, None, 1.5, "1 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_size(bad)


# ---------------------------------------------------------------------------------------------
# choosing, with fake trees

def test_no_limit_means_nolimiter(fake_v2):
    assert isinstance(_choose(fake_v2, limit=None), NoLimiter)
    assert isinstance(_choose(fake_v2, limit=0), NoLimiter)
    assert _choose(fake_v2, prefer="none").describe() == {"mechanism": "none", "limit_bytes": None, "path": None}


def test_v2_chosen_with_leaf_move_and_subtree_control(fake_v2):
    lim = _choose(fake_v2)
    own = fake_v2["own"]
    assert isinstance(lim, Cgroup2Limiter) and lim.fallback_reasons == []
    assert (own / "supervisor" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    assert (own / RUN / "cgroup.subtree_control").read_text() == "+memory"
    assert lim.describe() == {"mechanism": "cgroup2", "limit_bytes": 64 * MiB, "path": str(own / RUN)}


def test_v2_no_leaf_when_our_cgroup_is_empty(fake_v2):
    (fake_v2["own"] / "cgroup.procs").write_text("")
    (fake_v2["own"] / "cgroup.subtree_control").write_text("memory pids\n")  # already enabled: not rewritten
    lim = _choose(fake_v2)
    assert lim.mechanism == "cgroup2"
    assert not (fake_v2["own"] / "supervisor").exists()
    assert (fake_v2["own"] / "cgroup.subtree_control").read_text() == "memory pids\n"


def test_v2_prepare_oom_usage_kill(fake_v2):
    lim = _choose(fake_v2)
    spec = lim.prepare("s-abc-1")
    leaf = fake_v2["own"] / RUN / "s-abc-1"
    assert spec == LimitSpec("cgroup2", path=str(leaf), limit_bytes=64 * MiB)
    assert (leaf / "memory.max").read_text() == str(64 * MiB)
    assert (leaf / "memory.oom.group").read_text() == "1"
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert lim.oom_killed(spec) is False  # no memory.events yet
    _put(leaf / "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\n")
    assert lim.oom_killed(spec) is False
    _put(leaf / "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n")
    assert lim.oom_killed(spec) is True
    assert lim.usage(spec) is None  # no memory.current
    _put(leaf / "memory.current", "4096\n")
    assert lim.usage(spec) == {"current": 4096, "peak": None}
    _put(leaf / "memory.peak", "8192\n")
    assert lim.usage(spec) == {"current": 4096, "peak": 8192}
    _put(leaf / "cgroup.kill")
    lim.kill_all(spec)  # cgroup.procs absent: nothing to signal
    assert (leaf / "cgroup.kill").read_text() == "1"


@pytest.mark.parametrize("bad_key", ["../x", "a/b", "..", ""])
def test_prepare_rejects_unsafe_keys(fake_v2, bad_key):
    with pytest.raises(ValueError):
        _choose(fake_v2).prepare(bad_key)


def test_v2_without_memory_controller_falls_back(fake_v2, fake_v1):
    _put(fake_v2["own"].parent / "cgroup.controllers", "cpu pids\n")
    tree = dict(fake_v2, v1_root=fake_v1["v1_root"])
    _put(fake_v2["own"].parent.parent / "proc_self_cgroup", "4:memory:/a/b\n0::/svc\n")
    lim = _choose(tree)
    assert lim.mechanism == "cgroup1"
    assert len(lim.fallback_reasons) == 1 and "memory controller not available" in lim.fallback_reasons[0]


def test_v2_not_delegated_falls_back_to_rlimit(fake_v2):
    (fake_v2["own"] / "cgroup.controllers").write_text("pids\n")
    lim = _choose(fake_v2)
    assert isinstance(lim, RlimitLimiter)
    assert lim.fallback_reasons[0].startswith("cgroup2: memory controller not delegated")
    assert lim.fallback_reasons[1].startswith("cgroup1: no cgroup v1 memory controller")
    assert lim.prepare("k") == LimitSpec("rlimit", limit_bytes=64 * MiB)


def test_v2_refuses_root_cgroup(fake_v2):
    _put(fake_v2["own"].parent.parent / "proc_self_cgroup", "0::/\n")
    _put(fake_v2["own"].parent / "cgroup.procs", "1\n")
    lim = _choose(fake_v2)
    assert lim.mechanism == "rlimit" and "root cgroup" in lim.fallback_reasons[0]
    assert not (fake_v2["own"].parent / "supervisor").exists()


def test_v2_unwritable_falls_back_with_reason(fake_v2):
    # Root ignores file modes, so make the control file impossible to write at the OS level instead.
    (fake_v2["own"] / "cgroup.subtree_control").unlink()
    (fake_v2["own"] / "cgroup.subtree_control").mkdir()
    lim = _choose(fake_v2)
    assert lim.mechanism == "rlimit"
    assert "cgroup2:" in lim.fallback_reasons[0] and "subtree_control" in lim.fallback_reasons[0]


def test_prefer_forces_or_raises(fake_v2, fake_v1):
    assert _choose(fake_v2, prefer="rlimit").mechanism == "rlimit"
    with pytest.raises(ValueError, match="cgroup1.*unavailable"):
        _choose(fake_v2, prefer="cgroup1")
    with pytest.raises(ValueError, match="cgroup2"):
        _choose(fake_v1, prefer="cgroup2")
    with pytest.raises(ValueError, match="unknown"):
        _choose(fake_v1, prefer="bogus")


def test_v1_chosen_prepare_oom_usage(fake_v1):
    lim = _choose(fake_v1)
    parent = fake_v1["own"] / RUN
    assert isinstance(lim, Cgroup1Limiter) and lim.path == str(parent) and parent.is_dir()
    assert lim.fallback_reasons and lim.fallback_reasons[0].startswith("cgroup2: no pure cgroup v2 mount")
    spec = lim.prepare("s-x-2")
    leaf = parent / "s-x-2"
    assert spec == LimitSpec("cgroup1", path=str(leaf), limit_bytes=64 * MiB)
    assert (leaf / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (leaf / "memory.memsw.limit_in_bytes").read_text() == str(64 * MiB)
    _put(leaf / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert lim.oom_killed(spec) is False
    _put(leaf / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert lim.oom_killed(spec) is True
    _put(leaf / "memory.usage_in_bytes", "100\n")
    _put(leaf / "memory.max_usage_in_bytes", "200\n")
    assert lim.usage(spec) == {"current": 100, "peak": 200}


# ---------------------------------------------------------------------------------------------
# cpu and pids, with fake trees

@pytest.mark.parametrize("text,expected", [("0.5", 0.5), ("2", 2.0), (0, 0.0), ("none", 0.0), (0.01, 0.01)])
def test_parse_cores_ok(text, expected):
    assert parse_cores(text) == expected


@pytest.mark.parametrize("bad", ["", "half", "-1", "nan", "inf", 0.001, None])
def test_parse_cores_rejects(bad):
    with pytest.raises(ValueError, match="invalid cpu limit"):
        parse_cores(bad)


def test_v2_cpu_and_pids_go_into_the_memory_leaf(fake_v2):
    _put(fake_v2["own"] / "cgroup.controllers", "cpu memory pids\n")
    lim = _choose(fake_v2, cpu_limit=0.5, max_pids=32)
    run = fake_v2["own"] / RUN
    assert lim.describe()["cpu"] == {"mechanism": "cgroup2", "limit": 0.5, "path": None}
    assert lim.describe()["pids"] == {"mechanism": "cgroup2", "limit": 32, "path": None}
    spec = lim.prepare("s-x-1")
    leaf = run / "s-x-1"
    assert (leaf / "cpu.max").read_text() == "50000 100000" and (leaf / "pids.max").read_text() == "32"
    assert spec.join == []  # the child joins the memory leaf already
    _put(leaf / "pids.current", "3\n")
    _put(leaf / "cpu.stat", "usage_usec 1200\nuser_usec 1000\nsystem_usec 200\nnr_throttled 4\n")
    assert lim.control_usage(spec) == {"pids": {"current": 3}, "cpu": {"usage_usec": 1200, "throttled": 4}}


def test_v2_cpu_not_delegated_is_reported_unavailable_never_ignored(fake_v2):
    lim = _choose(fake_v2, cpu_limit=0.5, max_pids=32, v1_roots={"cpu": "/nonexistent", "pids": "/nonexistent"})
    cpu = lim.describe()["cpu"]
    assert cpu["mechanism"] == "unavailable" and "cpu controller not delegated" in cpu["reason"]
    assert lim.describe()["pids"]["mechanism"] == "cgroup2"
    assert any(r.startswith("cpu: cgroup2: cpu controller not delegated") for r in lim.fallback_reasons)
    assert "cpu" not in lim.prepare("s-x-1").controls


@pytest.fixture
def fake_v1_controls(fake_v1, tmp_path):
    """fake_v1 plus cpu and pids hierarchies of their own, our cgroups there /x and /p."""
    cpu, pids = tmp_path / "v1cpu", tmp_path / "v1pids"
    _put(cpu / "cpu.cfs_quota_us", "-1\n")
    (cpu / "x").mkdir()
    _put(pids / "cgroup.procs", "")
    (pids / "p").mkdir()
    _put(tmp_path / "proc_self_cgroup", "6:pids:/p\n5:cpu,cpuacct:/x\n4:memory:/a/b\n0::/\n")
    return {**fake_v1, "v1_roots": {"cpu": str(cpu), "pids": str(pids)}, "cpu_own": cpu / "x", "pids_own": pids / "p"}


@pytest.mark.parametrize("memory", [64 * MiB, 0])
def test_v1_cpu_and_pids_get_leaves_of_their_own_the_child_joins(fake_v1_controls, memory):
    tree = fake_v1_controls
    lim = _choose(tree, limit=memory, cpu_limit=0.2, max_pids=8, v1_roots=tree["v1_roots"])
    cpu_leaf, pids_leaf = tree["cpu_own"] / RUN / "s-x-1", tree["pids_own"] / RUN / "s-x-1"
    assert lim.describe()["cpu"] == {"mechanism": "cgroup1", "limit": 0.2, "path": str(tree["cpu_own"] / RUN)}
    spec = lim.prepare("s-x-1")
    assert spec.join == [str(cpu_leaf), str(pids_leaf)]
    assert (cpu_leaf / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu_leaf / "cpu.cfs_quota_us").read_text() == "20000"
    assert (pids_leaf / "pids.max").read_text() == "8"
    pid = _fork(lambda: apply_limits(spec))
    assert _wait(pid) == 0
    assert (cpu_leaf / "cgroup.procs").read_text() == str(pid) == (pids_leaf / "cgroup.procs").read_text()


def test_pids_without_a_cgroup_fall_back_to_rlimit_and_say_so(fake_v1):
    lim = _choose(fake_v1, cpu_limit=0, max_pids=8, v1_roots={"cpu": "/nonexistent", "pids": "/nonexistent"})
    pids = lim.describe()["pids"]
    assert pids["mechanism"] == "rlimit" and "RLIMIT_NPROC" in pids["reason"]
    assert lim.describe()["cpu"] == {"mechanism": "none", "limit": None, "path": None}


@pytest.mark.parametrize("own_uid", [True, False])
def test_a_pids_rlimit_is_reported_only_where_sessions_have_a_uid_of_their_own(fake_v1, own_uid):
    lim = _choose(fake_v1, max_pids=8, v1_roots={"cpu": "/nonexistent", "pids": "/nonexistent"}, pids_rlimit=own_uid)
    pids = lim.describe()["pids"]
    if own_uid:
        assert pids["mechanism"] == "rlimit"
    else:  # not root, or --sandbox off: nothing would enforce it, so it is not reported as enforced
        assert pids["mechanism"] == "unavailable" and "uid of its own" in pids["reason"], pids


def test_v1_own_cgroup_missing_falls_back(fake_v1):
    os.rmdir(fake_v1["own"])
    lim = _choose(fake_v1)
    assert lim.mechanism == "rlimit" and "not visible" in lim.fallback_reasons[1]


def test_nolimiter_and_rlimit_are_inert():
    for lim in (NoLimiter(), RlimitLimiter(64 * MiB)):
        spec = lim.prepare("k")
        assert lim.oom_killed(spec) is False and lim.usage(spec) is None
        lim.kill_all(spec), lim.release(spec), lim.close()
    assert NoLimiter().prepare("k") == LimitSpec()


def test_apply_limits_none_and_errors(tmp_path):
    apply_limits(LimitSpec())
    with pytest.raises(OSError):
        apply_limits(LimitSpec("bogus"))
    with pytest.raises(OSError):
        apply_limits(LimitSpec("cgroup1", path=str(tmp_path / "missing"), limit_bytes=1))


# ---------------------------------------------------------------------------------------------
# the real host

def _dead_pid() -> int:
    """A pid that no process holds: a child that has been reaped."""
    pid = _fork(lambda: 0)
    _wait(pid)
    return pid


@pytest.mark.parametrize("tree", ["fake_v2", "fake_v1"])
def test_start_sweeps_per_run_cgroups_of_dead_servers_only(tree, request):
    fake = request.getfixturevalue(tree)
    own, me = fake["own"], os.getpid()
    dead = own / f"corral-old@{_dead_pid()}.123"  # its server was SIGKILLed
    reused = own / f"corral-reused@{me}.{process_start_time(me) - 1}"  # our pid, another process's start
    alive = own / f"corral-peer@{me}.{process_start_time(me)}"  # a live server (here: us) owns it
    legacy = own / "corral-unmarked"  # no owner in the name: nobody can tell, so nobody touches it
    for path in (dead, reused, alive, legacy):
        path.mkdir()
    (dead / "s1-sess").mkdir()  # a per-spawn dir its agents left
    lim = _choose(fake)
    assert sorted(lim.swept) == sorted([str(dead), str(reused)])
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and legacy.exists() and (own / RUN).exists()


def test_run_dir_name_marks_its_owner():
    assert run_dir_name("r9", os.getpid()) == f"corral-r9@{os.getpid()}.{process_start_time(os.getpid())}"
    assert process_start_time(_dead_pid()) is None


def test_real_stale_run_is_swept(real_limiter):
    """The real kernel: a per-run cgroup (with a per-spawn one inside) of a dead server goes at the next start."""
    own = os.path.dirname(real_limiter.path)
    stale = os.path.join(own, f"corral-stale-{uuid.uuid4().hex[:8]}@{_dead_pid()}.1")
    os.makedirs(os.path.join(stale, "s1-gone"))
    try:
        lim = choose_limiter(64 * MiB, run_id=f"test-{uuid.uuid4().hex[:8]}")
        lim.close()
        assert stale in lim.swept and not os.path.exists(stale)
        assert os.path.exists(real_limiter.path)  # the live run next to it is untouched
    finally:
        if os.path.exists(stale):
            os.rmdir(os.path.join(stale, "s1-gone"))
            os.rmdir(stale)


@pytest.fixture
def real_limiter():
    """The limiter this host allows for 64 MiB; skips unless it is a cgroup one."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    lim = choose_limiter(64 * MiB, run_id=f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    print(f"\nhost memory limiter: {lim.describe()} fallback_reasons={lim.fallback_reasons}")
    if lim.mechanism not in ("cgroup1", "cgroup2"):
        lim.close()
        pytest.skip(f"no writable cgroup on this host: {lim.fallback_reasons}")
    yield lim
    lim.close()
    assert not os.path.exists(lim.path), "close() must remove the per-run parent"


def _expected_host_mechanism():
    """What this host should allow, judged independently from the mount points."""
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            if "memory" in f.read().split():
                return "cgroup2"
    except OSError:
        pass
    return "cgroup1" if os.path.exists("/sys/fs/cgroup/memory/memory.usage_in_bytes") else "rlimit"


def test_real_host_choice(real_limiter):
    assert real_limiter.mechanism == _expected_host_mechanism()


def test_real_oom_kill_and_sibling(real_limiter):
    hog_spec = real_limiter.prepare("s-hog-1")
    ok_spec = real_limiter.prepare("s-ok-1")
    hog = _fork(_hog(hog_spec, 200 * MiB))
    ok = _fork(_hog(ok_spec, 10 * MiB))
    hog_status, ok_status = _wait(hog), _wait(ok)
    assert os.WIFSIGNALED(hog_status) and os.WTERMSIG(hog_status) == signal.SIGKILL
    assert real_limiter.oom_killed(hog_spec) is True
    assert os.WIFEXITED(ok_status) and os.WEXITSTATUS(ok_status) == 0
    assert real_limiter.oom_killed(ok_spec) is False
    usage = real_limiter.usage(hog_spec)
    assert usage is not None
    assert usage["peak"] is None or usage["peak"] >= 32 * MiB
    for spec in (hog_spec, ok_spec):
        real_limiter.release(spec)
        assert not os.path.exists(spec.path)
    assert real_limiter.usage(hog_spec) is None  # gone, and still no exception


def _set_subreaper(on):
    """Become (or stop being) the reaper of orphaned descendants, so grandchildren can be waitpid'ed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def test_real_kill_all_kills_child_and_grandchild(real_limiter):
    spec = real_limiter.prepare("s-kill-1")
    r, w = os.pipe()

    def body():
        apply_limits(spec)
        grandchild = os.fork()
        if grandchild == 0:
            signal.pause()
            os._exit(0)
        os.write(w, f"{grandchild}\n".encode())
        signal.pause()

    _set_subreaper(True)
    try:
        pid = _fork(body)
        os.close(w)
        grandchild = int(os.read(r, 64))
        os.close(r)
        real_limiter.kill_all(spec)
        for p in (pid, grandchild):
            status = _wait(p)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        _set_subreaper(False)
    assert real_limiter.oom_killed(spec) is False
    real_limiter.release(spec)
    assert not os.path.exists(spec.path)


@pytest.fixture
def real_controls():
    """The host's cpu (0.2 cores) and pids (8) limits; skips unless both have a cgroup."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    lim = choose_limiter(0, run_id=f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}", cpu_limit=0.2, max_pids=8)
    print(f"\nhost controls: {lim.describe()} fallback_reasons={lim.fallback_reasons}")
    missing = [n for n in ("cpu", "pids") if not lim.controls[n].mechanism.startswith("cgroup")]
    if missing:
        lim.close()
        pytest.skip(f"no cgroup for {missing} on this host: {lim.fallback_reasons}")
    yield lim
    lim.close()
    assert all(not os.path.exists(c.group.path) for c in lim.controls.values() if c.group), "close() removes them"


def test_real_cpu_limit_holds_a_burning_process_near_its_share(real_controls):
    """Behaviour, not timing: a process burning CPU under 0.2 cores gets far less than a core (generous bounds)."""
    spec = real_controls.prepare("s-burn-1")
    r, w = os.pipe()

    def burn():
        apply_limits(spec)
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            pass
        used = os.times()
        os.write(w, f"{(used.user + used.system) / (time.monotonic() - start)}".encode())
        return 0

    pid = _fork(burn)
    assert _wait(pid) == 0
    os.close(w)
    share = float(os.read(r, 100))
    os.close(r)
    real_controls.release(spec)
    print(f"cpu share under --cpu-limit 0.2: {share:.2f} of a core")
    assert 0.05 < share < 0.5


def test_real_pids_limit_stops_a_fork_bomb(real_controls):
    spec = real_controls.prepare("s-bomb-1")

    def bomb():
        apply_limits(spec)
        made = 0
        for _ in range(50):
            try:
                child = os.fork()
            except OSError:
                break
            if child == 0:
                time.sleep(30)
                os._exit(0)
            made += 1
        return made

    pid = _fork(bomb)
    made = os.waitstatus_to_exitcode(_wait(pid))
    usage = real_controls.control_usage(spec)
    real_controls.release(spec)  # kills the sleepers
    assert made == 7  # pids.max 8 counts the forking process itself
    assert usage["pids"]["current"] == 7


def test_real_rlimit_memoryerror():
    lim = choose_limiter(64 * MiB, run_id="unused", prefer="rlimit")
    assert lim.describe() == {"mechanism": "rlimit", "limit_bytes": 64 * MiB, "path": None}
    hog = _fork(_hog(lim.prepare("s-hog-2"), 200 * MiB))
    ok = _fork(_hog(lim.prepare("s-ok-2"), 10 * MiB))
    hog_status, ok_status = _wait(hog), _wait(ok)
    assert os.WIFEXITED(hog_status) and os.WEXITSTATUS(hog_status) == OOM_EXIT_CODE
    assert os.WIFEXITED(ok_status) and os.WEXITSTATUS(ok_status) == 0
    assert lim.oom_killed(LimitSpec("rlimit")) is False
