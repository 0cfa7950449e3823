"""Sandbox uids are claimed host-wide (supervisor/uid_claims.py): two root servers with the same
--sandbox-uid-range never give one uid to two sessions, and one session's end (the uid sweep kills
everything left under its uid) never touches the other server's agent."""

import os

import psutil
import pytest

from corral.supervisor import sandbox_plan as policy
from corral.supervisor.uid_claims import UidClaims, claims_dir_problem

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the uid layer)")

RANGE = range(61500, 61502)


def test_two_servers_sandboxes_share_a_range_without_sharing_a_uid(tmp_path):
    claims = str(tmp_path / "claims")
    first = policy.choose_sandbox("auto", uid_range=RANGE, protected=[str(tmp_path)], claims_dir=claims)
    second = policy.choose_sandbox("auto", uid_range=RANGE, protected=[str(tmp_path)], claims_dir=claims)
    try:
        if not first.on("uid"):
            pytest.skip(f"no uid layer: {first.layers['uid']}")
        a, b = first.prepare("s1-a.1"), second.prepare("s1-b.1")
        assert {a["uid"], b["uid"]} == set(RANGE)
        with pytest.raises(OSError, match="another on this host"):
            second.prepare("s1-c.2")  # its other uid is the first server's
        first.release(a)
        assert second.prepare("s1-c.3")["uid"] == a["uid"]
    finally:
        first.close()
        second.close()


def test_a_dead_servers_claims_are_free_at_once(tmp_path):
    claims = UidClaims(str(tmp_path))
    assert claims.claim(61500) and not UidClaims(str(tmp_path)).claim(61500)
    claims.close()  # what the kernel does when the server dies: the locked files are closed
    assert UidClaims(str(tmp_path)).claim(61500)


def test_a_claims_dir_others_could_write_is_not_trusted(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert "only root can write" in claims_dir_problem(str(loose))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert "only root can write" in claims_dir_problem(str(tmp_path / "link"))
    assert claims_dir_problem(str(tmp_path / "fresh")) is None


async def test_one_servers_session_ending_leaves_the_others_agent_alone(make_supervisor, tmp_path):
    uids = f"{RANGE.start}-{RANGE.stop - 1}"
    first = await make_supervisor(sandbox_uid_range=uids, data_dir=tmp_path / "one", run_dir=tmp_path / "run-one")
    second = await make_supervisor(sandbox_uid_range=uids, data_dir=tmp_path / "two", run_dir=tmp_path / "run-two")
    if not first.sandbox.on("uid"):
        pytest.skip(f"no uid layer: {first.sandbox.layers['uid']}")
    mine = await first.get_or_create("mine", "default")
    theirs = await second.get_or_create("theirs", "default")
    await first.chat(mine, "my name is Ada")
    await second.chat(theirs, "my name is Grace")
    assert mine.sandbox["uid"] != theirs.sandbox["uid"]
    await first.queries.end("mine", "default")  # the zygote kills whatever is left under mine's uid
    assert psutil.pid_exists(theirs.pid) and psutil.Process(theirs.pid).status() != psutil.STATUS_ZOMBIE
    assert (await second.chat(theirs, "what is my name?"))["reply"] == "Your name is Grace."


def test_one_descriptor_holds_every_claim_and_the_old_lock_files_are_respected(tmp_path):
    import fcntl

    claims = UidClaims(str(tmp_path))
    before = len(os.listdir("/proc/self/fd"))
    assert all(claims.claim(uid) for uid in range(61500, 61550))
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    # a server of the previous release holds 61550 with an flock on its own file
    old = os.open(tmp_path / "61550.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(old, fcntl.LOCK_EX)
    assert not claims.claim(61550)
    os.close(old)
    assert claims.claim(61550)
    claims.close()
