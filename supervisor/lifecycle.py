"""Start and close of what the sessions share: the store, the hub, the limiter, the sandbox, the spawner.

A base of ``Supervisor`` (supervisor/registry.py), kept apart so the registry reads as one: it
starts the parts in dependency order and closes them in reverse, restarts the zygote when it dies,
runs retention on a timer and reports health. It holds no session state of its own.
"""

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import time

from corral.agent_proc import environment
from corral.supervisor import descriptors, errors, states
from corral.supervisor.agent_tmp import sweep_dead_trees
from corral.supervisor.egress import build_gateway
from corral.supervisor.hub import Hub
from corral.supervisor.limits import choose_limiter
from corral.supervisor.logs import get_logger
from corral.supervisor.node import claim_node
from corral.supervisor.sandbox import SandboxRefused, choose_sandbox
from corral.supervisor.spawner import SpawnError, ZygoteSpawner
from corral.supervisor.store import StoreError, create_store

log = get_logger(component="supervisor")



class Lifecycle:
    """Start, close and health of a Supervisor's shared parts."""

    async def start(self) -> None:
        """Open the store, bind the hub, start the zygote."""
        self.run_dir = tempfile.mkdtemp(prefix="corral-", dir=self._run_parent())
        os.chmod(self.run_dir, 0o700)
        try:
            await self._start_parts()
        except (SpawnError, StoreError, OSError, ValueError, SandboxRefused) as exc:
            await self.close()
            raise errors.StartupError(str(exc)) from exc
        except BaseException:
            await self.close()
            raise
        self._schedule_retention()
        self.usage.start()
        self.events.publish_global("node", state="joined", node=self.node)
        log.info("supervisor_started", run_dir=self.run_dir, limit=self.limiter.describe(), agent=self.config.agent)

    def _run_parent(self) -> str | None:
        """Parent of the run directory."""
        if self.config.run_dir:
            os.makedirs(self.config.run_dir, mode=0o700, exist_ok=True)
            return str(self.config.run_dir)
        return os.environ.get("XDG_RUNTIME_DIR") or None

    async def _start_parts(self) -> None:
        """Start each part in dependency order."""
        await self._sweep_agent_trees()
        self._choose_sandbox()  # before the limiter: whether sessions have uids of their own decides the pids fallback
        self._fit_max_sessions()

        if self.sandbox.network_mode == "proxy":
            self.gateway = build_gateway(self.config, self.tenant_egress, on_denied=self._egress_denied,
                                         on_count=self._egress_counted)
        limit = self.config.memory_limit or None
        # probing may sweep a dead server's cgroups, which waits for the kernel: off the loop
        self.limiter = await asyncio.to_thread(
            choose_limiter, limit, run_id=os.path.basename(self.run_dir).removeprefix("corral-"),
            prefer=self.config.limit_mechanism, cpu_limit=self.config.cpu_limit, max_pids=self.config.max_pids,
            pids_rlimit=self.sandbox.on("uid"))
        for reason in getattr(self.limiter, "fallback_reasons", ()):
            log.info("limit_mechanism_skipped", reason=reason)
        for path in getattr(self.limiter, "swept", ()):
            log.info("stale_cgroup_removed", path=path)
        log.info("limit_mechanism", **self.limiter.describe())
        if self.store is None:
            self.store = create_store(self.config.database_url, self.config.data_dir)
        # the identity first: a server whose identity is held by a live one must not touch the store
        if self.claim is None:
            self.claim = await claim_node(self.store, self.node)
        await self.store.open()
        await self._join_cluster()
        await self._end_orphans()
        self.hub = Hub(on_frame=self._on_frame, on_drop=self._on_drop, on_abuse=self._on_abuse,
                       on_pause=self._on_pause, frame_rate=self.config.agent_frame_rate)
        await self._start_spawner()

    async def _sweep_agent_trees(self) -> None:
        """Remove the agents' temp trees of dead servers (whatever this one's sandbox mode): off the loop."""
        for tree in await asyncio.to_thread(sweep_dead_trees):
            if tree["removed"]:
                log.info("stale_agent_tmp_removed", path=tree["path"], sessions=tree["sessions"], bytes=tree["bytes"])
            else:
                log.warning("stale_agent_tmp_left", path=tree["path"], sessions=tree["sessions"], bytes=tree["bytes"],
                            error=tree["error"])

    def _choose_sandbox(self) -> None:
        """Probe the sandbox layers; log each, in force or missing and why (strict refuses here)."""
        c = self.config
        protected = [str(c.data_dir), self.run_dir, str(c.tenants) if c.tenants else None]
        self.sandbox = choose_sandbox(
            c.sandbox, protected=protected, network_mode=c.agent_network, uid_range=c.uid_range,
            max_pids=c.max_pids, max_open_files=c.max_open_files, disk=c.agent_disk,
            run_id=os.path.basename(self.run_dir).removeprefix("corral-"))
        for name, layer in self.sandbox.layers.items():
            if layer["in_force"]:
                log.info("sandbox_layer", layer=name, detail=layer["detail"])
            else:
                log.warning("sandbox_layer_missing", layer=name, reason=layer["reason"])
        for note in self.sandbox.notes:
            log.warning("sandbox_note", note=note)
        log.info("sandbox", mode=self.sandbox.mode, network=self.sandbox.network_mode)
        if self.sandbox.network_mode == "host":
            log.warning("agent_network_shared", detail="agents share the host's network: they can reach its loopback "
                        "services (the database, corral's own port), the cloud metadata address, and listen on its "
                        "addresses; --agent-network proxy gives them a namespace of their own")

    def _egress_counted(self, session_id: str, tenant: str, field: str, amount: int) -> None:
        """Traffic through the egress gateway, for the session's and tenant's usage (billing)."""
        if field in ("bytes_in", "bytes_out"):
            self.usage.record_egress(session_id, bytes=amount, tenant=tenant)
        elif field == "requests":
            self.usage.record_egress(session_id, requests=amount, tenant=tenant)

    def _egress_denied(self, session_id: str, tenant: str, destination: str, reason: str) -> None:
        """A refusal at the egress gateway, for the admin event stream (it is logged and counted there)."""
        self.events.publish_global("egress_denied", session_id=session_id, tenant=tenant, destination=destination,
                                   reason=reason)

    def _fit_max_sessions(self) -> None:
        """Cap max_sessions at what the open-files limit and the sandbox uids hold, saying so in one line.

        Capped, not refused: the server serves what fits and answers 503 at_capacity past it, where
        refusing would leave every session down for a setting the operator can lower at leisure.
        """
        c = self.config
        fits = {"open files": (descriptors.sessions_that_fit(), "raise the open-files limit (ulimit -n) or run as root")}
        if self.sandbox.on("uid"):
            fits["sandbox uids"] = (self.sandbox.uid_count, "widen --sandbox-uid-range")
        by, (most, remedy) = min(fits.items(), key=lambda item: item[1][0])
        if most < c.max_sessions:
            log.warning("max_sessions_capped", requested=c.max_sessions, serving=max(1, most), limited_by=by,
                        message=f"--max-sessions {c.max_sessions} does not fit: the {by} allow {most}; serving at "
                                f"most {max(1, most)} ({remedy})")
            self.config = dataclasses.replace(c, max_sessions=max(1, most))

    async def _end_orphans(self) -> None:
        """End the sessions this server's previous run left live in the store (it died with them)."""
        lost = await self.store.end_orphans(self.claim.orphans_of, status=states.LOST, end_reason=states.LOST_REASON)
        if lost:
            log.warning("orphans_ended", node=self.node, sessions=lost, reason=states.LOST_REASON)

    async def _start_spawner(self) -> None:
        """Start a zygote."""
        launcher = self.launcher or ZygoteSpawner
        spawner = launcher(self.config.agent, limiter=self.limiter, sandbox=self.sandbox, on_lost=self._on_zygote_lost,
                           environment=self._zygote_environment(), gateway=self.gateway)
        await spawner.start()
        self.spawner = spawner

    def _zygote_environment(self) -> dict[str, str]:
        """The zygote's (and so every agent's) environment: the base, the ready agents' settings and ``--agent-env``."""
        tmpdir = self.sandbox.tmp_parent or tempfile.gettempdir()
        declared = {**environment.ready_agent_settings(os.environ),
                    **environment.declared_values(self.config.agent_env, os.environ)}
        return environment.zygote_environment(tmpdir, declared, os.environ)

    async def close(self) -> None:
        """Stop every session, the zygote and the hub; remove the run directory.

        One close runs, to its end: a caller cancelled meanwhile (a stop signal during start-up)
        does not cut it short, and a later caller waits for it.
        """
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        """Close the parts in reverse order of their start."""
        self._closing = True
        if self._retention_timer is not None:
            self._retention_timer.cancel()
        live = [s for s in self.sessions.values() if s.live]
        if live:
            stops = [s.life.stop(states.ENDED, force=self.drain.hurried) for s in live]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), self.config.stop_timeout + 2)
        if self.spawner is not None:
            await self.spawner.close()
        with contextlib.suppress(Exception):
            await self._leave_cluster()
        self.output.close()
        await self.background.wait(timeout=5)
        self.turn_deadlines.close()
        self.hung_turns.close()
        if self.hub is not None:
            self.hub.close()
        if self.gateway is not None:
            await self.gateway.close()
        if self.limiter is not None:
            await asyncio.to_thread(self.limiter.close)  # emptying cgroups waits for the kernel: off the loop
        if self.sandbox is not None:
            removal = await asyncio.to_thread(self.sandbox.close)  # removing temp dirs walks trees: off the loop
            if removal and not removal["removed"]:
                log.warning("agent_tmp_left", **removal)  # the next start's sweep takes it
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.usage.close()  # the ends of the sessions just stopped, before the store goes
            self.events.publish_global("node", state="left", node=self.node)
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.claim is not None:
            await self.claim.release()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("supervisor_stopped")

    def hurry(self) -> None:
        """Stop now (a further signal during the shutdown): SIGKILL every session's process, live or stopping.

        A live one is stopped (ended, not crashed: the stop comes first); one already stopping gets the SIGKILL.
        """
        self.drain.hurried = True
        for s in list(self.sessions.values()):
            if s.state == states.STOPPING:
                s.life.send_signal(signal.SIGKILL)
            elif s.live:
                self.background.spawn(s.life.stop(states.ENDED, force=True))

    def _on_zygote_lost(self) -> None:
        """The zygote died and took every agent with it: mark them crashed and start another."""
        self.spawner = None  # its processes' exits come on their futures, "the zygote died"
        if not self._closing:
            self._zygote_restart = self.background.spawn(self._restart_zygote())

    async def _restart_zygote(self) -> None:
        """Start a new zygote after the old one died."""
        try:
            await self._start_spawner()
        except Exception as exc:
            log.error("zygote_restart_failed", error=str(exc))

    def _schedule_retention(self) -> None:
        """Delete ended sessions past the retention period, on a timer."""
        interval = max(1.0, min(3600.0, self.config.retention / 4))
        loop = asyncio.get_running_loop()
        self._retention_timer = loop.call_later(interval, self._retention_due)

    def _retention_due(self) -> None:
        """Run one retention pass and schedule the next."""
        self.background.spawn(self.purge_ended())
        self._schedule_retention()

    async def purge_ended(self) -> int:
        """Delete sessions that ended more than ``retention`` seconds ago."""
        removed = await self.store_call(self.store.purge_ended(self.config.retention))
        if removed:
            log.info("retention_purged", sessions=removed)
            self.events.publish_global("purged", sessions=removed, retention=self.config.retention)
        return removed

    def egress_counts(self, session_id: str, tenant: str) -> dict | None:
        """A session's traffic through the egress gateway (bytes_in, bytes_out, requests, refused); None without one."""
        return self.gateway.counters_for(session_id, tenant) if self.gateway else None

    def egress_by_tenant(self) -> dict[str, dict]:
        """Every tenant's traffic through the egress gateway since start."""
        return self.gateway.tenant_counters() if self.gateway else {}

    def health(self) -> dict:
        """What /health reports about the supervisor."""
        return {
            "live_sessions": self.live_count,
            "max_sessions": self.config.max_sessions,  # after start-up's cap (_fit_max_sessions)
            "sessions_in_memory": len(self.sessions),
            "zygote_pid": self.spawner.pid if self.spawner else None,
            "limit": self.limiter.describe() if self.limiter else None,
            "sandbox": self.sandbox.describe(self.gateway and self.gateway.address()) if self.sandbox else None,
            "egress": self.gateway.describe() if self.gateway else None,
            "store": getattr(self.store, "backend", None),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
