"""Restart storms: an agent that dies on every start is respawned at most max_restarts times in
restart_window, then answers 503 session_failed with Retry-After, and the others do not notice.
"""

import asyncio
import json
import time

from tests.chaos_kit import call, client_session, error_code, latency_summary, running_app
from corral.web.keys import SUPERVISOR

OTHERS = 16
ROUNDS = 10  # messages per other session per phase


async def chat_round(http, url, ids, samples) -> list[int]:
    """One message to each session, concurrently; latencies into samples; return the statuses."""

    async def one(sid):
        started = time.monotonic()
        status, _ = await call(http, "POST", url + "/api/chat", json={"message": f"hi {sid}", "session_id": sid})
        samples.append(time.monotonic() - started)
        return status

    return await asyncio.gather(*(one(sid) for sid in ids))


async def phase(http, url, ids) -> tuple[list[int], list[float]]:
    """ROUNDS rounds of messages to every other session."""
    statuses, samples = [], []
    for _ in range(ROUNDS):
        statuses += await chat_round(http, url, ids, samples)
    return statuses, samples


async def test_restart_storm_fails_the_session_and_spares_the_others(make_config):
    config = make_config(agent="tests.agents.hostile:StormAgent", max_restarts=3, restart_window=120.0)
    others = [f"calm-{i}" for i in range(OTHERS)]
    async with running_app(config) as (app, url), client_session() as http:
        sup = app[SUPERVISOR]
        await chat_round(http, url, others, [])  # every other session up
        before_statuses, before = await phase(http, url, others)

        answers = []
        failed, others_done = asyncio.Event(), asyncio.Event()

        async def storm():
            """Hammer the storm session until it has failed and the others have had their rounds."""
            while not (failed.is_set() and others_done.is_set()):
                async with http.post(url + "/api/chat", json={"message": "x", "session_id": "storm-1"}) as resp:
                    body = await resp.json()
                    answers.append((resp.status, error_code(body), resp.headers.get("Retry-After")))
                    if resp.status == 503:
                        failed.set()

        async def calm():
            """The others chat through the whole storm (at least ROUNDS rounds)."""
            statuses, samples, rounds = [], [], 0
            while rounds < ROUNDS or not failed.is_set():
                statuses += await chat_round(http, url, others, samples)
                rounds += 1
            others_done.set()
            return statuses, samples

        *_, (during_statuses, during) = await asyncio.gather(*(storm() for _ in range(4)), calm())
        storm_session = sup.sessions["storm-1"]

    figures = {"before": latency_summary(before), "during": latency_summary(during),
               "storm_answers": len(answers), "storm_spawns": storm_session.life.generation}
    figures["median_ratio"] = round(figures["during"]["median_ms"] / figures["before"]["median_ms"], 2)
    print(json.dumps(figures))
    assert set(before_statuses) == {200} and set(during_statuses) == {200}  # the others never failed
    # One first start plus max_restarts respawns, then never again.
    assert storm_session.life.generation == 1 + config.max_restarts
    assert storm_session.state == "failed"
    crashes = [a for a in answers if a[0] == 502]
    failed = [a for a in answers if a[0] == 503]
    assert len(crashes) + len(failed) == len(answers)
    assert {a[1] for a in crashes} <= {"agent_crashed"} and len(crashes) >= 1
    assert failed and {a[1] for a in failed} == {"session_failed"}
    assert all(a[2] is not None and int(a[2]) >= 1 for a in failed)  # Retry-After on every one
    # Once failed, it stays failed: nothing after the first 503 is a 502.
    first_failed = next(i for i, a in enumerate(answers) if a[0] == 503)
    assert all(a[0] == 503 for a in answers[first_failed:])
