"""A real corral cluster for tests: N `corral serve` nodes on one PostgreSQL database, nginx in front."""

import asyncio
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import psutil

from tests.procs import free_port, start_server, wait_for_port, wait_gone

POSTGRES_URL = os.environ.get("CORRAL_TEST_DATABASE_URL")
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LEASE = 2.0  # --node-lease of the test nodes: failover takes about this long


async def create_database(base_url: str | None = None) -> tuple[str, str]:
    """A PostgreSQL database of its own (name, url) next to the test database (or ``base_url``'s)."""
    base_url = base_url or POSTGRES_URL
    name = f"corral_cluster_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(base_url)
    return name, urlunsplit(parts._replace(path=f"/{name}"))


async def drop_database(name: str, base_url: str | None = None) -> None:
    """Remove a database made by create_database, with any connections still open to it."""
    conn = await asyncpg.connect(base_url or POSTGRES_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class Node:
    """One `corral serve` subprocess of the cluster."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    @property
    def pid(self) -> int:
        """The server's pid."""
        return self.proc.pid


class Cluster:
    """Start, stop, pause and kill nodes sharing one database."""

    def __init__(self, tmp_path: Path, database_url: str):
        self.tmp_path, self.database_url = tmp_path, database_url
        self.nodes: list[Node] = []
        self.nginx: subprocess.Popen | None = None
        self.nginx_url: str | None = None
        self._started = 0

    def start_node(self, *args: str) -> Node:
        """Start one more node; it has joined the cluster once its port is open."""
        self._started += 1
        home = self.tmp_path / f"node{self._started}"
        home.mkdir()
        proc, url = start_server(home, "--database-url", self.database_url, "--node-lease", str(LEASE),
                                 "--stop-timeout", "2", "--rate-limit", "0", "--log-level", "info", *args)
        node = Node(proc, url, home / "serve.log")
        self.nodes.append(node)
        return node

    def start_nginx(self) -> str:
        """nginx with deploy/nginx.conf, its upstream pointed at the running nodes; returns its URL."""
        home = self.tmp_path / "nginx"
        home.mkdir(exist_ok=True)
        port = free_port()
        servers = "".join(f"    server {n.url.removeprefix('http://')} max_fails=1 fail_timeout=2s;\n"
                          for n in self.nodes)
        conf = (DEPLOY / "nginx.conf").read_text()
        conf = re.sub(r"(?m)^    server 127\.0\.0\.1:\d+[^\n]*\n", "", conf)
        conf = conf.replace("    keepalive 64;", servers + "    keepalive 64;")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        (home / "corral.conf").write_text(conf)
        temps = " ".join(f"{kind}_temp_path {home}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root;" if os.geteuid() == 0 else ""
        (home / "main.conf").write_text(
            f"daemon off; {user} pid {home}/nginx.pid; error_log {home}/error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; {temps} include {home}/corral.conf; }}\n")
        self.nginx = subprocess.Popen([NGINX, "-c", str(home / "main.conf"), "-p", str(home)],
                                      stderr=open(home / "stderr.log", "ab"))
        wait_for_port(port, self.nginx, timeout=20)
        self.nginx_url = f"http://127.0.0.1:{port}"
        return self.nginx_url

    def kill(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Send a signal to a node's server process."""
        os.kill(node.pid, sig)

    def close(self) -> None:
        """Stop nginx and every node (SIGCONT first, in case one is paused)."""
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)
        for node in self.nodes:
            if node.proc.poll() is None:
                os.kill(node.pid, signal.SIGCONT)
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)


def agent_processes(prefix: str) -> Counter:
    """How many agent processes each session whose id starts with ``prefix`` has, machine-wide."""
    found = Counter()
    marker = f"corral: agent sid={prefix}"
    for proc in psutil.process_iter(["cmdline"]):
        # psutil splits a title setproctitle wrote on spaces or NULs, depending on its padding
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(marker):
            found[title.split()[2].removeprefix("sid=")] += 1
    return found


class ProcessSampler:
    """Samples the agent processes of a set of sessions in the background; keeps the most seen at once."""

    def __init__(self, prefix: str, every: float = 0.05):
        self.prefix, self.every = prefix, every
        self.most: Counter = Counter()
        self.samples = 0
        self._task: asyncio.Task | None = None

    def __enter__(self) -> "ProcessSampler":
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            seen = await asyncio.to_thread(agent_processes, self.prefix)
            self.samples += 1
            for sid, n in seen.items():
                self.most[sid] = max(self.most[sid], n)
            await asyncio.sleep(self.every)  # a sampling period, not a wait for an event


async def chat(http: aiohttp.ClientSession, url: str, sid: str, message: str, **extra) -> tuple[int, dict, dict]:
    """POST /api/chat; (status, body, headers)."""
    async with http.post(f"{url}/api/chat", json={"session_id": sid, "message": message, **extra}) as r:
        return r.status, await r.json(), dict(r.headers)


async def get_json(http: aiohttp.ClientSession, url: str, path: str) -> tuple[int, dict]:
    """GET a JSON resource; (status, body)."""
    async with http.get(url + path) as r:
        return r.status, await r.json()


__all__ = ["Cluster", "ProcessSampler", "agent_processes", "chat", "create_database", "drop_database",
           "get_json", "wait_gone", "LEASE", "NGINX", "POSTGRES_URL"]


class CuttableLink:
    """A TCP relay to PostgreSQL that a test can cut: the network partition of the failure table."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listen on a free local port; return it."""
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
