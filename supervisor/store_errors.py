"""How the store's failures read to a client: the one conversion of a store error into the API's.

Every store call a request waits on goes through ``store_call``; the web layer's last resort
(web/error_responses.py) converts with the same ``api_error``, so a store failure reads the same whichever
path it took: the store unreachable is a 503 ``unavailable`` (its cause, which names files, hosts
and tables, goes to the log only), a write refused for a stale epoch is a ``session_moved``, and a
session purged while a request was on its way is a 404.
"""

from corral.supervisor import errors
from corral.supervisor.logs import get_logger
from corral.supervisor.session_keys import id_of
from corral.supervisor.store import UnknownSession, StaleEpoch, StoreError

log = get_logger(component="supervisor")

STORE_FAILURES = (StoreError, StaleEpoch, UnknownSession)


def api_error(exc: BaseException) -> errors.CorralError | None:
    """The API's error for a store failure, or None if ``exc`` is not one."""
    if isinstance(exc, StoreError):
        log.error("store_error", error=str(exc))
        return errors.Unavailable("the session store is unavailable; try again shortly", retry_after=5)
    if isinstance(exc, StaleEpoch):
        return errors.SessionMoved(f"session {id_of(exc.args[0])} was claimed by another node")
    if isinstance(exc, UnknownSession):
        return errors.SessionNotFound(f"session {id_of(exc.args[0])} was deleted")
    return None


async def store_call(coro):
    """Await a store operation; its failures raise as the API's errors (``api_error``)."""
    try:
        return await coro
    except STORE_FAILURES as exc:
        raise api_error(exc) from None
