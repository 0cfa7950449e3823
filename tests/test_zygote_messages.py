"""The spawner <-> zygote messages (agent_proc/zygote_messages.py): typed records, one codec for both sides."""

import pickle

import pytest

from corral.agent_proc import zygote_messages as msgs


def test_every_record_goes_through_the_codec_unchanged():
    records = [msgs.Ready(41, "libc"), msgs.Failed("cannot load agent"), msgs.Quit(),
               msgs.Spawn(spawn_id=7, session_id="s1", routing_id=b"s1/1/ab", tenant="acme",
                          limits={"memory": 1 << 20}, sandbox={"uid": 60001}, output=True),
               msgs.Spawned(7, 4242), msgs.SpawnFailed(8, "fork failed", 11), msgs.Exited(7, 9)]
    assert [msgs.decode(msgs.encode(r)) for r in records] == records


def test_a_message_this_side_does_not_know_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="unknown zygote message"):
        msgs.decode(pickle.dumps(("spawned_twice", 1, 2)))
    with pytest.raises(ValueError, match="malformed zygote message 'Exited'"):
        msgs.decode(pickle.dumps(("Exited", 1)))
