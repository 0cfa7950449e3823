"""The chaos engine shared by the reliability tests and ``bench/soak.py`` (same code, other sizes).

A real corral app on a real port, real agent processes, real HTTP clients. Every message carries a
per-session nonce, so a reply or a stored message that reached the wrong session is visible.
"""

import asyncio
import contextlib
import itertools
import os
import random
import re
import secrets
import signal
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import psutil
from aiohttp import web

from corral.supervisor import errors, states
from tests.conftest import wait_for_state
from corral.web.app import create_app
from corral.web.keys import SUPERVISOR

ADMIN_TOKEN = "chaos-admin-token"
CRASH_KINDS = ("exit", "signal", "exception")
# What a request to a harmed session may answer besides success: the documented errors of a
# session whose agent died, was killed or was interrupted under it.
HARM_ERRORS = {(502, "agent_crashed"), (502, "agent_oom"), (502, "session_ended"), (502, "agent_killed")}
_NONCE = re.compile(r"N[0-9a-f]{12}N")


def scaled(name: str, default: float) -> float:
    """A size read from ``CORRAL_<NAME>`` (so CI and the soak pick their own), else the default."""
    value = os.environ.get("CORRAL_" + name.upper())
    return type(default)(value) if value else default


# ---------------------------------------------------------------------------- the server


@contextlib.asynccontextmanager
async def running_app(config):
    """Serve the corral app on a free loopback port; yield (app, base url); clean up after."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def client_session(limit: int = 64) -> aiohttp.ClientSession:
    """An HTTP client with at most ``limit`` connections."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=120)
    )


async def call(http, method: str, url: str, **kwargs) -> tuple[int, dict]:
    """One HTTP request; return (status, decoded JSON body or {})."""
    async with http.request(method, url, **kwargs) as resp:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = {}
        return resp.status, body if isinstance(body, dict) else {}


def error_code(body: dict) -> str | None:
    """The ``error.code`` of an error body."""
    err = body.get("error")
    return err.get("code") if isinstance(err, dict) else None


# ---------------------------------------------------------------------------- process figures


@dataclass
class Figures:
    """The supervisor process's resources at one moment."""

    fds: int
    threads: int
    rss: int

    @classmethod
    def now(cls) -> "Figures":
        """Measure this process (the supervisor runs in it)."""
        me = psutil.Process()
        return cls(me.num_fds(), me.num_threads(), me.memory_info().rss)

    def growth(self, later: "Figures") -> dict:
        """How much each figure grew from this one to ``later``."""
        return {"fds": later.fds - self.fds, "threads": later.threads - self.threads,
                "rss_mib": round((later.rss - self.rss) / 2**20, 1)}


def agent_pids(prefix: str) -> set[int]:
    """Pids of agent processes whose title names a session id starting with ``prefix``."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"corral: agent sid={prefix}"):
            found.add(proc.pid)
    return found


def zombies_below(pid: int) -> list[int]:
    """Zombie processes among the descendants of ``pid``."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
    return out


def leftovers(sup, prefix: str) -> dict:
    """Agent processes outside live sessions (orphans) and zombies under us: both must be empty."""
    live = {s.pid for s in sup.sessions.values() if s.pid is not None}
    return {"orphans": sorted(agent_pids(prefix) - live), "zombies": zombies_below(os.getpid())}


def latency_summary(samples: list[float]) -> dict:
    """Median and p99 of latencies in milliseconds."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(ordered), "median_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)}


# ---------------------------------------------------------------------------- the chaos run


@dataclass
class ChaosPlan:
    """How big and how long a chaos run is."""

    sessions: int = 200
    clients: int = 64
    seconds: float = 10.0
    chaos_workers: int = 2
    harm_fraction: float = 0.4  # chaos only touches this share of sessions; the rest must never fail
    pace: float = 0.05  # seconds between two chaos actions of one worker (load shaping)
    memory_limit_mib: int = 64


@dataclass
class ChaosReport:
    """What happened, and every broken promise found (``violations`` must be empty)."""

    requests: Counter = field(default_factory=Counter)  # (status, code) -> n
    actions: Counter = field(default_factory=Counter)  # action -> n
    harmed: set = field(default_factory=set)
    latencies: list = field(default_factory=list)
    violations: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The figures worth printing."""
        return {
            "requests": sum(self.requests.values()),
            "outcomes": {f"{k[0]} {k[1]}": v for k, v in sorted(self.requests.items(), key=str)},
            "actions": dict(self.actions),
            "harmed_sessions": len(self.harmed),
            "latency": latency_summary(self.latencies),
            **self.figures,
            "violations": len(self.violations),
        }


class ChaosRun:
    """64 clients chat with 200 sessions while chaos workers kill, OOM, crash and interrupt some."""

    def __init__(self, app, url: str, http, plan: ChaosPlan):
        self.app, self.url, self.http, self.plan = app, url, http, plan
        self.sup = app[SUPERVISOR]
        self.prefix = secrets.token_hex(2) + "-"
        self.ids = [f"{self.prefix}{i:04d}" for i in range(plan.sessions)]
        self.nonce = {sid: f"N{secrets.token_hex(6)}N" for sid in self.ids}
        self.harmable = self.ids[: int(plan.sessions * plan.harm_fraction)]
        self.in_chaos: set[str] = set()
        self.quiet: set[str] = set()  # sessions clients leave alone (so an interrupt hits our own turn)
        self.sent = defaultdict(int)
        self.acked: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.failed: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self.report = ChaosReport()
        self.deadline = 0.0
        self.routes = {r.canonical for r in app.router.resources()}
        self.actions = itertools.cycle([self.sigkill, self.oom, self.crash, self.interrupt, self.kill])
        self.crash_kinds = itertools.cycle(CRASH_KINDS)
        self.ops_http = None  # chaos has its own connections: the clients keep theirs all busy

    # -- the clients

    async def chat(self, sid: str, http=None) -> tuple[int, dict]:
        """Send one nonce-carrying message (on ``http``, default the clients') and check the reply."""
        self.sent[sid] += 1
        text = f"{self.nonce[sid]} #{self.sent[sid]}"
        started = time.monotonic()
        status, body = await call(http or self.http, "POST", self.url + "/api/chat",
                                  json={"message": text, "session_id": sid})
        self.report.latencies.append(time.monotonic() - started)
        code = error_code(body) or body.get("status")
        self.report.requests[(status, code)] += 1
        if status == 200 and body.get("status") == "done":
            reply = body.get("reply")
            if reply != f"You said: {text}" or body.get("session_id") != sid:
                self.violation(f"{sid}: reply {reply!r} to {text!r} (session {body.get('session_id')})")
            self.acked[sid].append((text, reply))
        else:
            self.failed[sid].append((status, code))
        return status, body

    async def client(self) -> None:
        """Chat with random sessions until the deadline."""
        while time.monotonic() < self.deadline:
            sid = random.choice(self.ids)
            if sid not in self.quiet:
                await self.chat(sid)

    # -- the chaos

    async def chaos_worker(self, rng: random.Random) -> None:
        """Harm random harmable sessions, one action at a time, until the deadline."""
        while time.monotonic() < self.deadline:
            free = [sid for sid in self.harmable if sid not in self.in_chaos]
            sid = rng.choice(free)
            action = next(self.actions)  # round-robin, so even a short run does every kind
            self.in_chaos.add(sid)
            self.report.harmed.add(sid)
            try:
                await action(sid, rng)
            except Exception as exc:  # a broken promise, not a test crash: record and go on
                self.violation(f"{sid}: {action.__name__} raised {exc!r}")
            finally:
                self.in_chaos.discard(sid)
            await asyncio.sleep(self.plan.pace)

    async def live_session(self, sid: str):
        """The session, made live by a chat if it is down (chaos hits running processes)."""
        s = self.sup.sessions.get(sid)
        if s is None or s.state not in (states.IDLE, states.BUSY):
            # On chaos's own connections: the 64 clients keep the pool busy and a request waiting for
            # one of its connections can starve until the client timeout.
            await self.chat(sid, self.ops_http)
            s = self.sup.sessions.get(sid)
        return s

    async def sigkill(self, sid: str, rng) -> None:
        """SIGKILL the agent from outside; the session must come down as crashed."""
        s = await self.live_session(sid)
        if s is None or s.pid is None or s.state not in (states.IDLE, states.BUSY):
            return
        down = self.next_down(s)
        os.kill(s.pid, signal.SIGKILL)
        final = await asyncio.wait_for(down, 30)
        self.expect(sid, "sigkill", final in (states.CRASHED, states.KILLED), f"ended as {final}")

    async def oom(self, sid: str, rng) -> None:
        """Allocate past the memory limit: 502 agent_oom."""
        mib = self.plan.memory_limit_mib * 2
        status, code = await self.command(sid, "allocate", {"mib": mib})
        self.expect(sid, "oom", (status, code) == (502, "agent_oom"), f"answered {status} {code}")

    async def crash(self, sid: str, rng) -> None:
        """Crash with a random crash kind: 502 agent_crashed."""
        how = next(self.crash_kinds)
        status, code = await self.command(sid, "crash", {"how": how})
        self.report.actions[f"crash_{how}"] += 1
        self.expect(sid, f"crash {how}", (status, code) == (502, "agent_crashed"), f"answered {status} {code}")

    async def interrupt(self, sid: str, rng) -> None:
        """Start a long turn and interrupt it: the turn ends as interrupted, the process lives."""
        self.quiet.add(sid)  # the turn in progress must be ours, not a client's chat
        try:
            s = await self.live_session(sid)
            await self.wait_state(s, states.IDLE)  # clients' turns already sent have finished
            pid = s.pid
            turn = asyncio.ensure_future(self.command(sid, "sleep", {"seconds": 60}, full=True))
            await self.wait_state(s, states.BUSY)
            # A client request admitted before the session went quiet may still reach the agent
            # first and take the SIGINT; then ours is still running: interrupt again.
            for _ in range(12):
                await self.interrupt_turn(sid)
                done, _ = await asyncio.wait({turn}, timeout=5)
                if done:
                    break
            status, body = await turn
        finally:
            self.quiet.discard(sid)
        ok = status == 200 and body.get("status") == "interrupted" and s.pid == pid
        self.expect(sid, "interrupt", ok, f"answered {status} {body}")

    async def kill(self, sid: str, rng) -> None:
        """Kill the session through the admin API (202 while it stops): its process ends as killed."""
        s = await self.live_session(sid)
        down = self.next_down(s)
        status = await self.admin_kill(sid)
        final = await asyncio.wait_for(down, 30)
        self.expect(sid, "kill", status in (200, 202, 204) and final == states.KILLED,
                    f"answered {status}, ended {final}")

    def next_down(self, s) -> asyncio.Future:
        """A future for the next state the session goes down to (subscribed now, so it cannot be missed)."""
        down = asyncio.get_running_loop().create_future()

        def on_event(event):
            if event["type"] == "state" and event["state"] in states.DOWN and not down.done():
                down.set_result(event["state"])
                unsubscribe()

        unsubscribe = self.sup.events.subscribe_session(s.key, on_event)
        return down

    # -- the ways in (HTTP where the route exists, else the supervisor's own API)

    async def command(self, sid: str, command: str, args, *, full: bool = False):
        """Run an agent command; (status, code) or, with full, (status, body)."""
        if "/api/mcp-command" in self.routes:
            status, body = await call(self.ops_http, "POST", self.url + "/api/mcp-command",
                                      json={"command": command, "args": args, "session_id": sid})
        else:
            status, body = await self.via_supervisor(sid, command, args)
        return (status, body) if full else (status, error_code(body) or body.get("status"))

    async def via_supervisor(self, sid: str, command: str, args) -> tuple[int, dict]:
        """The supervisor-level equivalent of POST /api/mcp-command."""
        try:
            s = await self.sup.get_or_create(sid, "default")
            result = await self.sup.command(s, command, args)
            return 200, result
        except errors.CorralError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.message}}

    async def interrupt_turn(self, sid: str) -> None:
        """Interrupt the session's turn (admin API when there)."""
        if "/admin/sessions/{session_id}/interrupt" in self.routes:
            await call(self.ops_http, "POST", f"{self.url}/admin/sessions/{sid}/interrupt", headers=_admin())
        else:
            self.sup.interrupt(self.sup.sessions[sid])

    async def admin_kill(self, sid: str) -> int:
        """DELETE /admin/sessions/{id} (or ``sup.kill`` before the admin API exists)."""
        if "/admin/sessions/{session_id}" in self.routes:
            status, _ = await call(self.ops_http, "DELETE", f"{self.url}/admin/sessions/{sid}", headers=_admin())
            return status
        s = self.sup.sessions.get(sid)
        if s is not None:
            await self.sup.kill(s)
        return 200

    async def wait_state(self, s, state: str) -> None:
        """Wait (on the event bus) until the session is in ``state``."""
        await wait_for_state(self.sup, s, state, timeout=30)

    # -- bookkeeping

    def expect(self, sid: str, action: str, ok: bool, detail: str) -> None:
        """Count an action and record a violation if it did not end as documented."""
        self.report.actions[action.split()[0]] += 1
        if not ok:
            self.violation(f"{sid}: {action} {detail}")

    def violation(self, text: str) -> None:
        """Record a broken promise."""
        self.report.violations.append(text)

    # -- the whole run

    async def warm_up(self) -> None:
        """Start every session with one message."""
        await _bounded(self.plan.clients, [self.chat(sid) for sid in self.ids])

    async def run(self) -> ChaosReport:
        """Warm up, measure, load + chaos, heal, check everything; return the report."""
        async with client_session(2 * self.plan.chaos_workers) as self.ops_http:
            return await self._run()

    async def _run(self) -> ChaosReport:
        """The run, with the chaos connections open."""
        started = time.monotonic()
        await self.warm_up()
        self.report.figures["warm_up_s"] = round(time.monotonic() - started, 2)
        before = Figures.now()
        self.deadline = time.monotonic() + self.plan.seconds
        rngs = [random.Random(i) for i in range(self.plan.chaos_workers)]
        await asyncio.gather(*(self.client() for _ in range(self.plan.clients)),
                             *(self.chaos_worker(rng) for rng in rngs))
        self.report.figures["load_s"] = round(time.monotonic() - started, 2)
        await self.heal()
        after = Figures.now()
        self.report.figures["growth"] = before.growth(after)
        self.report.figures["before"] = vars(before)
        await self.check_outcomes()
        await self.check_histories()
        self.report.figures["checked_s"] = round(time.monotonic() - started, 2)
        left = leftovers(self.sup, self.prefix)
        self.report.figures.update(left)
        if left["orphans"] or left["zombies"]:
            self.violation(f"leftover processes: {left}")
        return self.report

    async def heal(self) -> None:
        """Every harmed session must work again: one more message each, all must succeed."""
        results = await _bounded(self.plan.clients, [self.chat(sid) for sid in sorted(self.report.harmed)])
        for sid, (status, body) in zip(sorted(self.report.harmed), results):
            if status != 200 or body.get("status") != "done":
                self.violation(f"{sid}: did not work again after chaos: {status} {body}")

    async def check_outcomes(self) -> None:
        """Unharmed sessions never failed; harmed ones failed only with documented errors."""
        for sid in self.ids:
            fails = self.failed.get(sid, [])
            if sid not in self.report.harmed and fails:
                self.violation(f"{sid} was never harmed but got {fails}")
            odd = [f for f in fails if f not in HARM_ERRORS and f != (200, "interrupted")]
            if odd:
                self.violation(f"{sid}: undocumented errors {odd}")

    async def check_histories(self) -> None:
        """Every acknowledged exchange is in its session's history; no message carries a foreign nonce."""
        for sid in self.ids:
            history = await self.sup.store.history(sid)
            contents = [(m.role, m.content) for m in history]
            for text, reply in self.acked.get(sid, []):
                if ("user", text) not in contents or ("assistant", reply) not in contents:
                    self.violation(f"{sid}: acknowledged {text!r} missing from history")
            foreign = {n for _, c in contents for n in _NONCE.findall(c)} - {self.nonce[sid]}
            if foreign:
                self.violation(f"{sid}: history holds other sessions' nonces {foreign}")


async def _bounded(limit: int, coros) -> list:
    """Run coroutines with at most ``limit`` at once; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


def _admin() -> dict:
    """Headers of an admin request."""
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
