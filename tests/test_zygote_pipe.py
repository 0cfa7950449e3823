"""The supervisor <-> zygote pipe carries its messages intact."""

import multiprocess

from corral.agent_proc.zygote import recv_msg, send_msg


def test_messages_cross_the_pipe_unchanged():
    ours, theirs = multiprocess.Pipe(duplex=True)
    try:
        request = ("spawn", {"session_id": "s-1", "tenant": "t", "token": b"\x00\xff" * 8,
                             "limits": {"kind": "rlimit", "limit_bytes": 1 << 29}, "spawn_id": 7})
        send_msg(ours, request)
        assert recv_msg(theirs) == request
        send_msg(theirs, ("exited", 1234, 9))
        assert recv_msg(ours) == ("exited", 1234, 9)
    finally:
        ours.close()
        theirs.close()
