"""One identity, one live server: a second ``corral serve`` never touches a live server's sessions.

Real ``corral serve`` processes on SQLite and PostgreSQL: the second server on a taken port (or on
a SQLite file another server holds) exits 1 with one line, and the first server's sessions stay
live in the store with their history. Then the claim itself, in process, on both backends.
"""

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from corral.supervisor import Supervisor
from corral.supervisor.node import NodeTaken
from corral.supervisor.store import create_store
from tests.conftest import POSTGRES_URL, drop_schema
from tests.procs import free_port, start_server
from tests.test_serve import post

CORRAL = str(Path(sys.executable).with_name("corral"))
needs_pg = pytest.mark.skipif(not POSTGRES_URL, reason="CORRAL_TEST_DATABASE_URL is not set "
                              "(e.g. postgresql://postgres@127.0.0.1:5432/test)")


def run_second(*args) -> subprocess.CompletedProcess:
    """Run a second ``corral serve`` to its end."""
    return subprocess.run([CORRAL, "serve", *args], capture_output=True, text=True, timeout=60)


def assert_refused(result: subprocess.CompletedProcess, says: str) -> None:
    """Exit 1 and one short line on stderr saying why."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and says in lines[0] and len(lines[0]) < 300, result.stderr


def port_of(url: str) -> int:
    """The port of a base URL."""
    return int(url.rsplit(":", 1)[1])


def sqlite_row(tmp_path, session_id: str):
    """(status, ended_at) of a session in the test's SQLite file, read behind the server's back."""
    with sqlite3.connect(tmp_path / "data" / "corral.sqlite3") as db:
        return db.execute("SELECT status, ended_at FROM sessions WHERE id = ?", (session_id,)).fetchone()


def tell_alice(url: str, session_id: str) -> None:
    """A session of the first server that knows a name."""
    assert post(url, "/api/chat", {"message": "my name is Alice", "session_id": session_id})["reply"] == "Got it: your name is Alice."


def first_is_untouched(url: str, row: tuple) -> None:
    """The first server's session is live in the store and still answers from its history."""
    status, ended_at = row
    assert status != "lost" and ended_at is None
    assert post(url, "/api/chat", {"message": "what is my name?", "session_id": "s1"})["reply"] == "Your name is Alice."


@pytest.mark.parametrize("second_port", ["same", "other"])
def test_second_server_on_sqlite_leaves_the_first_alone(tmp_path, second_port):
    first, url = start_server(tmp_path)
    try:
        tell_alice(url, "s1")
        port = port_of(url) if second_port == "same" else free_port()
        result = run_second("--port", str(port), "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run2"))
        assert_refused(result, "already in use" if second_port == "same" else f"in use by another corral server (pid {first.pid})")
        first_is_untouched(url, sqlite_row(tmp_path, "s1"))
    finally:
        first.kill()
        first.wait()


@pytest.fixture
def pg_url():
    """A database URL whose search path is a fresh schema (dropped afterwards)."""
    if not POSTGRES_URL:
        pytest.skip("CORRAL_TEST_DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    schema = f"corral_node_{uuid.uuid4().hex[:12]}"

    async def create():
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()

    asyncio.run(create())
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}search_path={schema}"
    asyncio.run(drop_schema(schema))


def pg_row(url: str, session_id: str):
    """(status, ended_at) of a session in PostgreSQL, read behind the server's back."""

    async def read():
        conn = await asyncpg.connect(url)
        try:
            return tuple(await conn.fetchrow("SELECT status, ended_at FROM sessions WHERE id = $1", session_id))
        finally:
            await conn.close()

    return asyncio.run(read())


def test_second_server_on_a_taken_port_leaves_postgresql_alone(tmp_path, pg_url):
    database_url = pg_url
    first, url = start_server(tmp_path, "--database-url", database_url)
    try:
        tell_alice(url, "s1")
        result = run_second("--port", str(port_of(url)), "--database-url", database_url,
                            "--data-dir", str(tmp_path / "data2"), "--run-dir", str(tmp_path / "run2"))
        assert_refused(result, "already in use")
        first_is_untouched(url, pg_row(database_url, "s1"))
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------- the claim, in process


async def test_one_sqlite_file_one_server(make_supervisor, make_config, tmp_path):
    first = await make_supervisor(port=8080)
    s = await first.get_or_create("s1", "t1")
    await first.chat(s, "my name is Alice")
    second = Supervisor(make_config(port=8081), store=create_store(None, tmp_path / "data"))
    with pytest.raises(NodeTaken, match="in use by another corral server"):
        await second.start()
    assert (await first.store.get_session(s.key)).ended_at is None
    await first.close()
    third = await make_supervisor(port=8081)  # the file is free again
    assert (await third.store.get_session(s.key)).status == "ended"  # closed by its server, not lost


@needs_pg
async def test_one_postgresql_node_name_one_server(make_config):
    schema = f"corral_node_{uuid.uuid4().hex[:12]}"
    started = []

    async def start(port: int, in_schema: str = schema) -> Supervisor:
        sup = Supervisor(make_config(port=port), store=create_store(POSTGRES_URL, schema=in_schema))
        await sup.start()
        started.append(sup)
        return sup

    try:
        first = await start(8080)
        s = await first.get_or_create("p1", "t1")
        await first.chat(s, "my name is Alice")
        with pytest.raises(NodeTaken, match="already served by another live corral server"):
            await start(8080)
        other = await start(8081)
        assert (await other.store.get_session(s.key)).ended_at is None  # another node's session: left alone
        elsewhere = await start(8080, schema + "_b")  # the same name in another schema is another identity
        assert elsewhere.claim.orphans_of == first.claim.orphans_of  # one host:port name, two schemas
        await first.close()
        again = await start(8080)
        assert (await again.store.get_session(s.key)).status == "ended"  # the name is free again
    finally:
        for sup in started:
            await sup.close()
        await drop_schema(schema)
        await drop_schema(schema + "_b")
