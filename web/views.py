"""How sessions read in JSON: to their tenant, and to the admin.

A session is either a live ``Session`` the supervisor holds or a ``SessionRecord`` from the
store (no process on this node); both read the same way.
"""

import time

from corral.supervisor.session import Session


def session_view(found, **extra) -> dict:
    """The fields every seed route answers with (live Session or stored record)."""
    if isinstance(found, Session):
        view = {
            "session_id": found.id,
            "state": found.state,
            "is_processing": found.is_processing,
            "message_count": found.message_count,
            "agent_state": found.agent_state,
        }
    else:
        # No process here: nothing is in progress, and the agent's state lives only in its process.
        view = {
            "session_id": found.id,
            "state": found.status,
            "is_processing": False,
            "message_count": found.message_count,
            "agent_state": {},
        }
    return {**view, **extra}


def new_session_view(session_id: str, **extra) -> dict:
    """The view of a session that does not exist yet (it starts with its first message)."""
    return {"session_id": session_id, "state": None, "is_processing": False, "message_count": 0,
            "agent_state": {}, **extra}


def session_detail(found) -> dict:
    """What ``GET /api/sessions/{id}`` shows a tenant: the view plus times and end reason."""
    row = admin_row(found)
    keep = ("created_at", "last_activity", "idle_seconds", "end_reason", "live")
    return session_view(found, **{key: row[key] for key in keep})


def admin_row(found, procstats=None) -> dict:
    """One row of the admin API: process, owner, state, times, counts (+ process stats if given)."""
    if not isinstance(found, Session):
        return _record_row(found)
    row = found.describe()
    row["last_activity"] = round(time.time() - found.idle_seconds(), 3)
    row["live"] = found.live
    if procstats is not None:
        row.update(procstats.for_session(found))
    return row


def _record_row(record) -> dict:
    """An admin row for a session only the store knows (no process on this node)."""
    return {
        "session_id": record.id,
        "tenant": record.tenant,
        "state": record.status,
        "pid": None,
        "created_at": record.created_at,
        "last_activity": record.last_activity,
        "idle_seconds": round(max(0.0, time.time() - record.last_activity), 3),
        "age_seconds": None,
        "message_count": record.message_count,
        "restarts": 0,
        "is_processing": False,
        "end_reason": record.end_reason,
        "exit": None,
        "metadata": record.metadata,
        "live": False,
        "node": record.node,  # in a cluster: the node that owns it (its process, if any, is there)
    }


def message_view(message) -> dict:
    """One stored message as the API shows it."""
    return {"seq": message.seq, "role": message.role, "content": message.content, "created_at": message.created_at}
