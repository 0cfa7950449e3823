"""How sessions read in JSON: to their tenant, and to the admin.

Every route renders a ``SessionView`` (supervisor/views.py): a session this node holds and one
only the store knows read the same way.
"""

from corral.supervisor.views import SessionView

# The admin row's keys in the order each kind of session has always listed them (the API's bytes).
_HELD_ROW = ("session_id", "tenant", "state", "pid", "created_at", "idle_seconds", "age_seconds", "message_count",
             "restarts", "is_processing", "end_reason", "exit", "metadata", "last_activity", "live")
_STORED_ROW = ("session_id", "tenant", "state", "pid", "created_at", "last_activity", "idle_seconds", "age_seconds",
               "message_count", "restarts", "is_processing", "end_reason", "exit", "metadata", "live",
               "node")  # in a cluster: the node that owns it (its process, if any, is there)


def session_view(view: SessionView, **extra) -> dict:
    """The fields every seed route answers with."""
    return {
        "session_id": view.id,
        "state": view.state,
        "is_processing": view.is_processing,
        "message_count": view.message_count,
        "agent_state": view.agent_state,
        **extra,
    }


def new_session_view(session_id: str, **extra) -> dict:
    """The view of a session that does not exist yet (it starts with its first message)."""
    return {"session_id": session_id, "state": None, "is_processing": False, "message_count": 0,
            "agent_state": {}, **extra}


def session_detail(view: SessionView) -> dict:
    """What ``GET /api/sessions/{id}`` shows a tenant: the view plus times and end reason."""
    keep = ("created_at", "last_activity", "idle_seconds", "end_reason", "live")
    return session_view(view, **{key: getattr(view, key) for key in keep})


def admin_row(view: SessionView, procstats=None) -> dict:
    """One row of the admin API: process, owner, state, times, counts (+ process figures if given and held)."""
    keys = _HELD_ROW if view.held else _STORED_ROW
    row = {key: getattr(view, "id" if key == "session_id" else key) for key in keys}
    if procstats is not None and view.held:
        row.update(procstats.for_session(view))
    return row


def message_view(message) -> dict:
    """One stored message as the API shows it."""
    return {"seq": message.seq, "role": message.role, "content": message.content, "created_at": message.created_at}
