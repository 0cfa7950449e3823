"""Start and close of what the sessions share: the run dir, the sandbox, the limiter, the store, the hub, the spawner.

``Lifecycle`` is a part the registry (``Supervisor``, supervisor/registry.py) holds as
``lifecycle``: it owns the shared parts, starts them in dependency order and closes them in
reverse, and restarts the zygote when it dies. It holds no session: the registry stops its sessions
and asks the cluster to join or leave between these steps.
"""

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile

from corral.agent_proc import environment
from corral.supervisor import descriptors, errors, host_memory, states
from corral.supervisor.agent_tmp import sweep_dead_trees
from corral.supervisor.egress import build_gateway
from corral.supervisor.hub import Hub
from corral.supervisor.limit_plan import choose_limiter
from corral.supervisor.logs import get_logger
from corral.supervisor.node import claim_node
from corral.supervisor.sandbox_plan import SandboxRefused, choose_sandbox
from corral.supervisor.spawner import SpawnError, ZygoteSpawner
from corral.supervisor.store import StoreError, create_store

log = get_logger(component="supervisor")

# What a start may fail with that the operator can act on: the server refuses to start, saying why.
STARTUP_REFUSALS = (SpawnError, StoreError, OSError, ValueError, SandboxRefused)


class Lifecycle:
    """The shared parts of one server, from start to close."""

    def __init__(self, config, *, background, store=None, claim=None, launcher=None, tenant_egress=None,
                 on_egress_denied=None, on_egress_counted=None):
        """``store``/``claim``: given already made (else made at start); ``launcher``: the spawner class.

        ``background``: the registry's task set, which runs zygote restarts past their caller;
        ``tenant_egress``: each tenant's egress rules; ``on_egress_denied``: told of each refusal at the gateway;
        ``on_egress_counted``: told of each count there (session, tenant, field, amount), for usage.
        """
        self.config = config
        self.background = background
        self.store = store
        self.claim = claim  # this server's hold on its identity, from before the store opens; released at close
        self.launcher = launcher or ZygoteSpawner  # supervisor/spawner.py's interface
        self.tenant_egress = dict(tenant_egress or {})  # tenant -> its egress rules and upstreams (tenants file)
        self.on_egress_denied = on_egress_denied
        self.on_egress_counted = on_egress_counted
        self.gateway = None  # the egress gateway (supervisor/egress/), with --agent-network proxy
        self.run_dir: str | None = None
        self.limiter = None
        self.sandbox = None
        self.hub: Hub | None = None
        self.spawner = None  # the running launcher, None while the zygote restarts
        self.closing = False
        self._zygote_restart: asyncio.Task | None = None

    @property
    def run_id(self) -> str:
        """This run's name in cgroups and temp trees (the run directory's suffix)."""
        return os.path.basename(self.run_dir).removeprefix("corral-")

    def make_run_dir(self) -> None:
        """This run's private directory (removed at close)."""
        self.run_dir = tempfile.mkdtemp(prefix="corral-", dir=self._run_parent())
        os.chmod(self.run_dir, 0o700)

    async def open(self, node: str) -> None:
        """The sandbox, the limiter, then this node's identity and the store."""
        await self._sweep_agent_trees()
        self._choose_sandbox()  # before the limiter: whether sessions have uids of their own decides the pids fallback
        self.fit_max_sessions()
        self._note_host_memory()
        if self.sandbox.network_mode == "proxy":
            self.gateway = build_gateway(self.config, self.tenant_egress, on_denied=self.on_egress_denied,
                                         on_count=self.on_egress_counted)
        limit = self.config.memory_limit or None
        # probing may sweep a dead server's cgroups, which waits for the kernel: off the loop
        self.limiter = await asyncio.to_thread(
            choose_limiter, limit, run_id=self.run_id,
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
            self.claim = await claim_node(self.store, node)
        await self.store.open()

    def _run_parent(self) -> str | None:
        """Parent of the run directory."""
        if self.config.run_dir:
            os.makedirs(self.config.run_dir, mode=0o700, exist_ok=True)
            return str(self.config.run_dir)
        return os.environ.get("XDG_RUNTIME_DIR") or None

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
            max_pids=c.max_pids, max_open_files=c.max_open_files, disk=c.agent_disk, run_id=self.run_id)
        self.sandbox.immortal_heap = c.immortal_heap
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

    def fit_max_sessions(self) -> None:
        """Cap max_sessions at what the open-files limit and the sandbox uids hold, saying so in one line.

        Capped, not refused: the server serves what fits and answers 503 at_capacity past it, where
        refusing would leave every session down for a setting the operator can lower at leisure.
        The registry takes the capped config after ``open``.
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

    @staticmethod
    def _note_host_memory() -> None:
        """Say once what the host's memory monitors will cost as sessions add up (supervisor/host_memory.py)."""
        note = host_memory.note()
        if note:
            log.warning("host_memory_note", note=note)

    async def end_orphans(self, node: str) -> None:
        """End the sessions this server's previous run left live in the store (it died with them)."""
        lost = await self.store.end_orphans(self.claim.orphans_of, status=states.LOST, end_reason=states.LOST_REASON)
        if lost:
            log.warning("orphans_ended", node=node, sessions=lost, reason=states.LOST_REASON)

    async def launch(self, **on) -> None:
        """Bind the hub (``on``: its on_frame/on_drop/on_abuse/on_pause callbacks) and start a zygote."""
        self.hub = Hub(frame_rate=self.config.agent_frame_rate, **on)
        await self._start_spawner()

    async def _start_spawner(self) -> None:
        """Start a zygote."""
        spawner = self.launcher(self.config.agent, limiter=self.limiter, sandbox=self.sandbox,
                                on_lost=self._on_zygote_lost, environment=self._zygote_environment(),
                                gateway=self.gateway)
        await spawner.start()
        self.spawner = spawner

    def _zygote_environment(self) -> dict[str, str]:
        """The zygote's (and so every agent's) environment: the base, the ready agents' settings and ``--agent-env``."""
        tmpdir = self.sandbox.tmp_parent or tempfile.gettempdir()
        declared = {**environment.ready_agent_settings(os.environ),
                    **environment.declared_values(self.config.agent_env, os.environ)}
        return environment.zygote_environment(tmpdir, declared, os.environ)

    async def ready_spawner(self):
        """The spawner to launch with (waiting for a zygote restart in progress); 503 if there is none."""
        if self.spawner is None and self._zygote_restart is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._zygote_restart), self.config.spawn_timeout)
        if self.spawner is None:
            raise errors.Unavailable("the zygote is restarting", retry_after=1)
        return self.spawner

    def _on_zygote_lost(self) -> None:
        """The zygote died and took every agent with it: their exits come on their futures; start another."""
        self.spawner = None  # its processes' exits come on their futures, "the zygote died"
        if not self.closing:
            self._zygote_restart = self.background.spawn(self._restart_zygote())

    async def _restart_zygote(self) -> None:
        """Start a new zygote after the old one died."""
        try:
            await self._start_spawner()
        except Exception as exc:
            log.error("zygote_restart_failed", error=str(exc))

    def begin_close(self) -> bool:
        """Mark the server closing (no more spawns, no zygote restart); False if it already was."""
        if self.closing:
            return False
        self.closing = True
        return True

    async def close_spawner(self) -> None:
        """Stop the zygote (after the sessions stopped)."""
        if self.spawner is not None:
            await self.spawner.close()

    async def close(self) -> None:
        """Close the hub, the limiter, the sandbox, the store and the identity; remove the run directory."""
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
                await self.store.close()
        if self.claim is not None:
            await self.claim.release()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def describe(self) -> dict:
        """What /health reports about the shared parts."""
        return {
            "zygote_pid": self.spawner.pid if self.spawner else None,
            "limit": self.limiter.describe() if self.limiter else None,
            "sandbox": self.sandbox.describe(self.gateway and self.gateway.address()) if self.sandbox else None,
            "egress": self.gateway.describe() if self.gateway else None,
            "store": getattr(self.store, "backend", None),
        }
