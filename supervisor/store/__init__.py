"""Persistence of sessions and their messages: SQLite (default), PostgreSQL, or in-memory."""
from __future__ import annotations

import os
from pathlib import Path

from .base import (
    ACTIVATIONS, MessageRecord, NodeRecord, Placement, SessionRecord, StaleEpoch, Store, StoreError, UnknownSession,
)
from .memory import MemoryStore

__all__ = ["Store", "SessionRecord", "MessageRecord", "Placement", "NodeRecord", "ACTIVATIONS", "StoreError",
           "UnknownSession",
           "StaleEpoch", "MemoryStore", "create_store", "DEFAULT_SQLITE_NAME"]

DEFAULT_SQLITE_NAME = "corral.sqlite3"


def create_store(database_url: str | None, data_dir: str | os.PathLike[str] | None = None,
                 **kwargs) -> Store:
    """The store a database URL names; None/"" means SQLite at <data_dir>/corral.sqlite3.

    Nothing is connected until `await store.open()`. kwargs go to the backend's constructor
    (e.g. schema= for PostgreSQL).
    """
    url = (database_url or "").strip()
    if not url:
        return _default_sqlite(data_dir, **kwargs)
    scheme = url.partition(":")[0].lower()
    if scheme == "sqlite":
        return _sqlite(url[len("sqlite:"):], **kwargs)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore  # asyncpg only when asked for
        return PostgresStore(url, **kwargs)
    if scheme == "memory":
        return MemoryStore()
    # only the scheme is echoed: the rest of the URL may hold a password
    raise StoreError(f"unsupported database url scheme {scheme!r} "
                     "(use sqlite:///path, postgresql://... or memory:)")


def _default_sqlite(data_dir: str | os.PathLike[str] | None, **kwargs) -> Store:
    """SQLite file in the data dir, which is created private (0700)."""
    if data_dir is None:
        raise StoreError("no database url and no data dir given")
    directory = Path(data_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create data dir {directory}: {exc}") from exc
    return _sqlite(str(directory / DEFAULT_SQLITE_NAME), **kwargs)


def _sqlite(rest: str, **kwargs) -> Store:
    """SQLite store for the part after "sqlite:" ("///abs/path" or "relative")."""
    from .sqlite import SQLiteStore
    path = rest[2:] if rest.startswith("//") else rest  # sqlite:///abs -> /abs
    if path.startswith("/"):
        path = "/" + path.lstrip("/")  # SQLAlchemy-style sqlite:////abs means the same file
    if not path:
        raise StoreError("sqlite url without a path (use sqlite:///abs/path or sqlite:relative)")
    return SQLiteStore(os.path.expanduser(path), **kwargs)
