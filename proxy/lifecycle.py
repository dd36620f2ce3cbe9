"""The model server's life: start it, wait until it is ready, watch it, and restart it
(or give up) by the configured policy. Wires the supervisor to the probes."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial

import aiohttp

from .config import Config
from .probes import Probe, probe_grpc, probe_http, probe_tcp, wait_until_ready, watch
from .supervisor import ChildProcess, Reaper, RestartBackoff, spawn

log = logging.getLogger("model_proxy")
child_log = logging.getLogger("model_server")

STARTUP_PROBE_INTERVAL = 0.025  # fast while starting: ready → /ready 200 within ~25 ms
PROBE_TIMEOUT = 1.0


class ModelServer:
    """Keeps one model server process running for as long as the policy allows.

    `on_phase(phase, pid)` reports each change (starting, ready, unready, restarting,
    stopped) and `on_restart()` each restart; `run()` returns the proxy's exit code
    when the policy gives up, and runs until cancelled otherwise."""

    def __init__(
        self,
        config: Config,
        *,
        reaper: Reaper,
        session: aiohttp.ClientSession,
        on_phase: Callable[[str, int | None], None],
        on_restart: Callable[[], None],
        backoff: RestartBackoff | None = None,
    ) -> None:
        self._config = config
        self._backoff = backoff or RestartBackoff()  # tests pass one with short delays
        self._reaper = reaper
        self._on_phase = on_phase
        self._on_restart = on_restart
        self.child: ChildProcess | None = None
        self.stopping = False
        server = config.docker_server
        base = f"http://127.0.0.1:{server.server_port}"
        timeout = min(PROBE_TIMEOUT, max(config.proxy.probe_interval_seconds, 0.1))
        self._readiness: Probe = (
            partial(probe_http, session, base + server.readiness_endpoint, timeout)
            if server.readiness_endpoint
            else partial(probe_tcp, "127.0.0.1", server.server_port, timeout)
        )
        self._liveness: Probe | None = (
            partial(probe_http, session, base + server.liveness_endpoint, timeout)
            if server.liveness_endpoint
            else None
        )
        if config.transport.kind == "grpc":
            # a gRPC-only child has no HTTP endpoint: its health service answers both
            health = config.proxy.grpc_health_service
            grpc = partial(probe_grpc, "127.0.0.1", server.server_port, health, timeout)
            self._readiness = self._liveness = grpc

    async def run(self) -> int:
        config = self._config
        backoff = self._backoff
        env = {**os.environ, **config.environment_variables}
        while True:
            child = spawn(
                config.docker_server.start_command, env, reaper=self._reaper, on_line=_child_line
            )
            self.child = child
            self._on_phase("starting", child.pid)
            log.info(
                "started the model server (pid %d): %s",
                child.pid,
                config.docker_server.start_command,
            )
            reason = await self._until_ready(child)
            ever_ready = reason == "ready"
            if ever_ready:
                backoff.reset()
                took = time.monotonic() - child.started_at  # started_at is monotonic too
                log.info("the model server is ready after %.2f s", took)
                self._on_phase("ready", child.pid)
                reason = await self._while_running(child)
            if self.stopping:
                return 0
            self._on_phase(self._after_exit, None)
            if reason != "exited":
                child.kill()
            await child.stop(config.proxy.child_stop_grace_seconds)
            if config.proxy.restart_policy == "never":
                log.error("the model server %s; restart_policy is never: shutting down", reason)
                return 1
            if backoff.record_exit(ever_ready):
                log.error(
                    "the model server %s %d times in a row without becoming ready: giving up",
                    reason, backoff.give_up_after,
                )  # fmt: skip
                return 1
            delay = backoff.next_delay()
            log.warning("the model server %s; restarting in %g s", reason, delay)
            self._on_restart()
            await asyncio.sleep(delay)
            if self.stopping:
                return 0

    async def stop(self, grace: float) -> None:
        self.stopping = True
        killed = self.child is not None and await self.child.stop(grace)
        if killed and grace > 0:  # with no grace the SIGKILL is what was asked for
            log.warning("the model server was still running %g s after SIGTERM: killed", grace)
        self._on_phase("stopped", None)

    def kill(self) -> None:
        self.stopping = True
        if self.child is not None:
            self.child.kill()

    async def _until_ready(self, child: ChildProcess) -> str:
        loop = asyncio.get_running_loop()
        deadline = child.started_at + self._config.health_checks.startup_threshold_seconds
        ready = wait_until_ready(
            self._readiness, interval=STARTUP_PROBE_INTERVAL, deadline=deadline, clock=loop.time
        )
        winner, result = await race({"probe": ready, "exit": self._exited(child)})
        if winner == "probe":
            return "ready" if result else "was not ready in time"
        return "exited"

    async def _while_running(self, child: ChildProcess) -> str:
        loop = asyncio.get_running_loop()
        settings = self._config.proxy
        checks = self._config.health_checks
        liveness_failed = asyncio.Event()

        def on_readiness(ok: bool) -> None:
            if child.exit_code is None and not self.stopping:
                self._on_phase("ready" if ok else "unready", child.pid)
                log.warning(
                    "the model server is %s",
                    "ready again" if ok else "failing readiness: traffic stopped",
                )

        def on_liveness(ok: bool) -> None:
            if not ok:
                liveness_failed.set()

        racers: dict[str, Awaitable[object]] = {
            "exit": self._exited(child),
            "readiness": watch(
                self._readiness,
                interval=settings.probe_interval_seconds,
                threshold=checks.stop_traffic_threshold_seconds,
                on_change=on_readiness,
                clock=loop.time,
            ),
        }
        if self._liveness is not None:
            racers["liveness"] = watch(
                self._liveness,
                interval=settings.probe_interval_seconds,
                threshold=checks.restart_threshold_seconds,
                on_change=on_liveness,
                clock=loop.time,
            )
            racers["liveness failed"] = liveness_failed.wait()
        winner, _ = await race(racers)
        return "exited" if winner == "exit" else "failed its liveness probe"

    @property
    def _after_exit(self) -> str:
        return "restarting" if self._config.proxy.restart_policy == "always" else "stopped"

    async def _exited(self, child: ChildProcess) -> str:
        code = await child.wait()
        # /ready and /health turn 503 in the very step the exit is seen, before it is
        # logged: whoever reads the log line can no longer get a 200 (during a drain too).
        self._on_phase("stopped" if self.stopping else self._after_exit, None)
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "the model server (pid %d) exited with code %d", child.pid, code)
        return "exited"


async def race(racers: dict[str, Awaitable[object]]) -> tuple[str, object]:
    """Run the awaitables together; the name and result of the first to finish (the rest
    are cancelled)."""
    tasks = {asyncio.ensure_future(aw): name for name, aw in racers.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = done.pop()
    return tasks[first], first.result()


def _child_line(stream: str, line: str) -> None:
    child_log.info(line, extra={"stream": stream})
