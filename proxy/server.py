"""serve(config) -> exit code: the listener, the model server, the signals, and the drain
in its documented order."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from .app import Proxy
from .config import Config
from .lifecycle import ModelServer, race
from .supervisor import Reaper

log = logging.getLogger("model_proxy")

FORCED_EXIT = 130  # a second SIGINT, as a shell reports an interrupted program


class Signals:
    """SIGTERM/SIGINT start the drain; a second SIGINT forces an immediate exit."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self._on_stop = on_stop  # runs inside the signal handler: /ready turns 503 at once
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.received_at = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_signal, signal.SIGINT)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)

    def _on_signal(self, signum: int) -> None:
        if self.stop.is_set():
            if signum == signal.SIGINT:
                log.warning("second interrupt: stopping now")
                self.force.set()
            return
        log.info("received %s: draining", signal.Signals(signum).name)
        self.received_at = asyncio.get_running_loop().time()
        self._on_stop()
        self.stop.set()


async def serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    settings = config.proxy
    proxy = Proxy(config)
    signals = Signals(on_stop=proxy.start_draining)
    signals.install(loop)
    reaper = Reaper()
    reaper.install(loop)
    try:
        listener = await loop.create_server(
            proxy.connection, settings.host, settings.port, backlog=4096, reuse_address=True
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        reaper.uninstall()
        signals.uninstall(loop)
        return 1
    log.info(
        "listening on %s:%d, forwarding to 127.0.0.1:%d",
        settings.host, settings.port, config.docker_server.server_port,
    )  # fmt: skip

    def on_restart() -> None:
        proxy.state.restarts += 1
        proxy.metrics.restarts += 1

    model = ModelServer(config, reaper=reaper, on_phase=proxy.state.enter, on_restart=on_restart)
    try:
        code = await _run_until_stopped(proxy, listener, model, signals, config)
    finally:
        model.kill()  # whatever happened above, no model server outlives the proxy
    proxy.pool.close()
    if proxy.grpc_upstream is not None:
        proxy.grpc_upstream.close()
    if proxy.access_log is not None:
        proxy.access_log.flush()
    await listener.wait_closed()
    reaper.uninstall()
    signals.uninstall(loop)
    log.info("stopped (exit code %d)", code)
    return code


async def _run_until_stopped(
    proxy: Proxy, listener: asyncio.Server, model: ModelServer, signals: Signals, config: Config
) -> int:
    life = asyncio.create_task(model.run())
    stop = asyncio.create_task(signals.stop.wait())
    await asyncio.wait({life, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not life.done():
        return await _drain(proxy, listener, model, life, signals, config)
    # the policy gave up on the model server: no drain, nothing to serve
    stop.cancel()
    listener.close()
    proxy.draining = proxy.closed = True
    _abort_all(proxy)
    await model.stop(config.proxy.child_stop_grace_seconds)
    return life.result()


async def _drain(
    proxy: Proxy,
    listener: asyncio.Server,
    model: ModelServer,
    life: asyncio.Task[int],
    signals: Signals,
    config: Config,
) -> int:
    """The contract's drain: /ready 503 → serve until quiet → close the listener → let
    in-flight work finish within the grace → stop the model server's process group."""
    loop = asyncio.get_running_loop()
    settings = config.proxy
    deadline = signals.received_at + settings.shutdown_grace_seconds
    model.stopping = True  # an exit from now on is not restarted
    proxy.last_request_at = max(proxy.last_request_at, signals.received_at)
    started = time.monotonic()
    # the quiet period lets load balancers catch up with /ready's 503; a server never ready
    # was in no endpoint list, so nothing is on its way
    quiet = settings.drain_quiet_seconds if model.ever_ready else 0.0
    if not model.ever_ready:
        log.info("the model server was never ready: no quiet period")

    while not signals.force.is_set():
        quiet_until = min(proxy.last_request_at + quiet, deadline)

        if quiet_until <= loop.time():
            break
        await _until(signals.force.wait(), quiet_until - loop.time())
    listener.close()
    proxy.closed = True
    for connection in list(proxy.connections):
        if connection.idle:
            connection.close()
    for h2_connection in list(proxy.h2_connections):
        h2_connection.go_away()  # HTTP/2: GOAWAY; closed once its streams are done
    for undecided in list(proxy.sniffing):
        undecided.close()  # connected, nothing sent yet: idle
    log.info("listener closed; %d requests in flight", proxy.active)

    if not signals.force.is_set():
        await _until(
            race({"idle": proxy.idle.wait(), "forced": signals.force.wait()}),
            deadline - loop.time(),
        )
    if proxy.active:
        log.warning("%d requests still in flight after the grace: cutting them", proxy.active)
    _abort_all(proxy)
    await _close_websockets(proxy, signals)
    life.cancel()
    await asyncio.gather(life, return_exceptions=True)
    # forced already, or while the model server stops: the race ends at once either way
    await _until(
        race(
            {
                "stopped": model.stop(settings.child_stop_grace_seconds),
                "forced": signals.force.wait(),
            }
        ),
        settings.child_stop_grace_seconds + 5,
    )
    if signals.force.is_set():
        model.kill()
        await model.stop(0)
        return FORCED_EXIT
    log.info("drained in %.2f s", time.monotonic() - started)
    return 0


async def _close_websockets(proxy: Proxy, signals: Signals) -> None:
    """Open WebSockets end with 1001 once the HTTP drain is over."""
    if not proxy.tunnels:
        return
    log.info("closing %d WebSockets", len(proxy.tunnels))
    for tunnel in list(proxy.tunnels):
        tunnel.going_away()  # each cuts its sockets itself if the peers do not answer
    await race({"closed": proxy.no_tunnels.wait(), "forced": signals.force.wait()})
    for tunnel in list(proxy.tunnels):
        tunnel.abort()


def _abort_all(proxy: Proxy) -> None:
    for connection in list(proxy.connections):
        connection.abort()
    for h2_connection in list(proxy.h2_connections):
        h2_connection.cut()  # its streams reset, the model server's too


async def _until(awaitable: Awaitable[object], seconds: float) -> None:
    """Wait for `awaitable` at most `seconds`."""
    try:
        async with asyncio.timeout(max(seconds, 0)):
            await awaitable
    except TimeoutError:
        pass
