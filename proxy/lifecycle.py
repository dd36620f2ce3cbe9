"""The model server's life: start it, wait until it is ready, watch it, and restart it
(or give up) by the configured policy. Wires the supervisor to the probes."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial

from .config import Config
from .probes import Probe, probe_grpc, probe_http, probe_tcp, wait_until_ready, watch
from .supervisor import ChildProcess, Reaper, RestartBackoff, spawn

log = logging.getLogger("model_proxy")
child_log = logging.getLogger("model_server")

STARTUP_PROBE_INTERVAL = 0.025  # fast while starting: ready → /ready 200 within ~25 ms
PROBE_TIMEOUT = 1.0
PROGRESS_INTERVAL = 30.0  # while not ready, a line this often says what the probe saw
PORT_CHECK_INTERVAL = 0.05  # waiting for a stopped server's port to free, before a restart
# the shell's codes for a command it cannot run, and how soon after the first start such an
# exit means the command itself is wrong (later, it is the server's own exit code)
CANNOT_RUN = {126: "found but not executable", 127: "not found"}
CANNOT_RUN_WITHIN = 10.0
NO_PROBE_YET = "nothing yet (no probe has finished)"


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
        on_phase: Callable[[str, int | None], None],
        on_restart: Callable[[], None],
        backoff: RestartBackoff | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self._config = config
        self._backoff = backoff or RestartBackoff()  # tests pass one with short delays
        self._progress_interval = progress_interval
        self._reaper = reaper
        self._on_phase = on_phase
        self._on_restart = on_restart
        self.child: ChildProcess | None = None
        self.stopping = False
        self.ever_ready = False  # a child became ready since the proxy started
        self._ready = False  # the child's readiness as last decided
        self._was_ready = False  # the child has been ready since its start
        self._last_probe = NO_PROBE_YET
        server = config.docker_server
        port = server.server_port
        timeout = min(PROBE_TIMEOUT, max(config.proxy.probe_interval_seconds, 0.1))
        self._probe_target = (
            f"GET {server.readiness_endpoint}"
            if server.readiness_endpoint
            else f"TCP 127.0.0.1:{port}"
        )
        self._readiness: Probe = (
            partial(probe_http, "127.0.0.1", port, server.readiness_endpoint, timeout, self._saw)
            if server.readiness_endpoint
            else partial(probe_tcp, "127.0.0.1", port, timeout, self._saw)
        )
        self._liveness: Probe | None = (
            partial(probe_http, "127.0.0.1", port, server.liveness_endpoint, timeout)
            if server.liveness_endpoint
            else None
        )
        if config.transport.kind == "grpc":
            # a gRPC-only child has no HTTP endpoint: its health service answers both
            health = config.proxy.grpc_health_service
            grpc = partial(probe_grpc, "127.0.0.1", port, health, timeout)
            self._readiness = self._liveness = grpc

    async def run(self) -> int:
        config = self._config
        server = config.docker_server
        backoff = self._backoff
        env = {**os.environ, **config.environment_variables}
        if (problem := _user_switch_problem(server.run_as_user_id)) is not None:
            log.error("%s", problem)
            return 1
        first = True
        while True:
            # never forward to a server that is not our child: the child would not get the
            # port, and the probes would find the other one ready
            port_grace = 0.0 if first else config.proxy.child_stop_grace_seconds
            if not await self._port_free(server.server_port, port_grace):
                log.error(
                    "127.0.0.1:%d (docker_server.server_port) already accepts connections:"
                    " another process listens there%s; stop it or change server_port",
                    server.server_port,
                    "" if first else f" {port_grace:g} s after the model server stopped",
                )
                return 1
            if self.stopping:
                return 0
            try:
                child = spawn(
                    server.start_command,
                    env,
                    reaper=self._reaper,
                    on_line=_child_line,
                    user=server.run_as_user_id,
                )
            except OSError as exc:  # no /bin/sh, or the user switch refused
                log.error("cannot start the model server: %s", exc)
                return 1
            self.child = child
            self._last_probe = NO_PROBE_YET
            self._on_phase("starting", child.pid)
            log.info("started the model server (pid %d): %s", child.pid, server.start_command)
            progress = asyncio.create_task(self._report_progress(child))
            try:
                reason = await self._until_ready(child)
                ready_at = time.monotonic() if reason == "ready" else None
                if ready_at is not None:
                    took = ready_at - child.started_at  # started_at is monotonic too
                    log.info("the model server is ready after %.2f s", took)
                    self._was_ready = self.ever_ready = True
                    self._on_phase("ready", child.pid)
                    reason = await self._while_running(child)
            finally:
                progress.cancel()
                self._ready = self._was_ready = False
            ended_at = time.monotonic()
            if self.stopping:
                return 0
            self._on_phase(self._after_exit, None)
            if reason != "exited":
                child.kill()
            await child.stop(config.proxy.child_stop_grace_seconds)
            if first and ready_at is None and (why := _cannot_run(child, ended_at)):
                log.error(
                    "the start command cannot run (exit %d: the command was %s; the shell's"
                    " message is above): giving up",
                    child.exit_code, why,
                )  # fmt: skip
                return 1
            first = False
            if config.proxy.restart_policy == "never":
                log.error("the model server %s; restart_policy is never: shutting down", reason)
                return 1
            ready_for = None if ready_at is None else ended_at - ready_at
            if backoff.record_exit(ready_for):
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

    def _saw(self, what: str) -> None:
        if what != self._last_probe:  # a probe every 25 ms while starting: changes only
            log.debug("the readiness probe (%s) sees: %s", self._probe_target, what)
        self._last_probe = what

    async def _port_free(self, port: int, grace: float) -> bool:
        """Whether nothing accepts connections on 127.0.0.1:`port`, waiting up to `grace`
        seconds for it to become so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        waiting = False
        while not self.stopping and await probe_tcp("127.0.0.1", port, PROBE_TIMEOUT):
            if loop.time() >= deadline:
                return False
            if not waiting:
                waiting = True
                log.warning(
                    "waiting up to %g s for 127.0.0.1:%d to free: something still listens"
                    " there after the model server stopped",
                    grace, port,
                )  # fmt: skip
            await asyncio.sleep(PORT_CHECK_INTERVAL)
        return True

    async def _report_progress(self, child: ChildProcess) -> None:
        """While the child is not ready, a line every interval with what the probe saw."""
        while True:
            await asyncio.sleep(self._progress_interval)
            if self._ready:
                continue
            if self._was_ready:
                state, level = "is failing readiness", logging.WARNING
            else:
                elapsed = time.monotonic() - child.started_at
                state, level = f"is not ready {elapsed:.0f} s after its start", logging.INFO
            log.log(
                level,
                "the model server (pid %d) %s; the readiness probe (%s) last saw: %s",
                child.pid, state, self._probe_target, self._last_probe,
            )  # fmt: skip

    async def _until_ready(self, child: ChildProcess) -> str:
        loop = asyncio.get_running_loop()
        deadline = child.started_at + self._config.health_checks.startup_threshold_seconds
        ready = wait_until_ready(
            self._readiness, interval=STARTUP_PROBE_INTERVAL, deadline=deadline, clock=loop.time
        )
        winner, result = await race({"probe": ready, "exit": self._exited(child)})
        if winner == "probe":
            self._ready = bool(result)
            return "ready" if result else "was not ready in time"
        return "exited"

    async def _while_running(self, child: ChildProcess) -> str:
        loop = asyncio.get_running_loop()
        settings = self._config.proxy
        checks = self._config.health_checks
        liveness_failed = asyncio.Event()

        def on_readiness(ok: bool) -> None:
            self._ready = ok
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


def _user_switch_problem(user: int | None) -> str | None:
    """Why the model server cannot run as `user`, if it cannot: only root can switch."""
    euid = os.geteuid()
    if user is None or euid in (0, user):
        return None
    return (
        f"docker_server.run_as_user_id is {user}, but the proxy runs as uid {euid} and only"
        " root can start a process as another user: run the proxy as root (the model server"
        " still runs as that user), or remove the key"
    )


def _cannot_run(child: ChildProcess, ended_at: float) -> str | None:
    """How the shell said it cannot run the command, if it exited so soon after its start."""
    code = child.exit_code
    if code not in CANNOT_RUN or ended_at - child.started_at > CANNOT_RUN_WITHIN:
        return None
    return CANNOT_RUN[code]


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
