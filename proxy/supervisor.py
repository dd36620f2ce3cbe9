"""The model server's process group: spawn, reap, stop, and its output lines."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

MAX_LINE_BYTES = 64 * 1024
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

OnLine = Callable[[str, str], None]
_SignalHandler = Callable[[int, FrameType | None], Any] | int


def _prctl_subreaper(value: int) -> int | None:
    """Set the child-subreaper flag; return its previous value, None where unsupported."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
            return None
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, value, 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return previous.value


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it just runs as someone else
    return True


class Reaper:
    """Owns SIGCHLD: reaps every exited child (orphans included) and reports tracked exits."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_subreaper: int | None = None
        self._previous_handler: _SignalHandler | None = None
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._groups: dict[int, asyncio.Future[None]] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Orphaned grandchildren are reparented to us, so their zombies are ours to reap
        # and their deaths reach us as SIGCHLD (this is what a PID 1 must do anyway).
        self._previous_subreaper = _prctl_subreaper(1)
        try:
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
        except RuntimeError:
            # uvloop refuses SIGCHLD (it keeps it for its own subprocesses, unused here); a
            # plain handler runs from uvloop's signal wakeup fd and hands over to the loop.
            previous = signal.signal(signal.SIGCHLD, self._on_sigchld)
            self._previous_handler = signal.SIG_DFL if previous is None else previous
        self._reap()  # a child may have exited before the handler was there

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGCHLD, self._previous_handler)
            self._previous_handler = None
        elif self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None
        if self._previous_subreaper is not None:
            _prctl_subreaper(self._previous_subreaper)
            self._previous_subreaper = None

    @property
    def installed(self) -> bool:
        return self._loop is not None

    def track(self, pid: int) -> tuple[asyncio.Future[int], asyncio.Future[None]]:
        """Futures for `pid`'s exit code and for the end of the process group it leads."""
        if self._loop is None:
            raise RuntimeError("Reaper.install() must be called first")
        exited: asyncio.Future[int] = self._loop.create_future()
        gone: asyncio.Future[None] = self._loop.create_future()
        self._exits[pid] = exited
        self._groups[pid] = gone
        return exited, gone

    def _on_sigchld(self, _signum: int, _frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: hand over to the loop at once.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited = self._exits.pop(pid, None)
            if exited is not None and not exited.done():
                exited.set_result(os.waitstatus_to_exitcode(status))
        # A group only empties when its last member is reaped, which happens here;
        # its leader is in it until reaped, so only groups without a leader are checked.
        for pgid, gone in list(self._groups.items()):
            if gone.done():  # a ChildProcess saw it gone first
                del self._groups[pgid]
            elif pgid not in self._exits and not _group_exists(pgid):
                del self._groups[pgid]
                gone.set_result(None)


class _LineProtocol(asyncio.Protocol):
    """Splits a pipe's bytes into lines for `on_line`; cuts overlong lines, drops nothing."""

    def __init__(self, stream: str, on_line: OnLine, closed: asyncio.Future[None]) -> None:
        self._stream = stream
        self._on_line = on_line
        self._closed = closed
        self._partial = bytearray()

    def data_received(self, data: bytes) -> None:
        self._partial += data
        if b"\n" in data:
            *lines, rest = self._partial.split(b"\n")
            self._partial = rest
            for line in lines:
                self._emit(line)
        # Bound the memory a line without newlines can take.
        while len(self._partial) > MAX_LINE_BYTES:
            self._emit_piece(self._partial)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = bytearray()
        if not self._closed.done():
            self._closed.set_result(None)

    def _emit(self, line: bytearray) -> None:
        while len(line) > MAX_LINE_BYTES:
            self._emit_piece(line)
        self._on_line(self._stream, line.decode("utf-8", errors="replace"))

    def _emit_piece(self, buffer: bytearray) -> None:
        """Emit and remove the first piece of `buffer`, cut where no UTF-8 character is split."""
        cut = MAX_LINE_BYTES
        while cut > MAX_LINE_BYTES - 3 and buffer[cut] & 0xC0 == 0x80:
            cut -= 1
        self._on_line(self._stream, buffer[:cut].decode("utf-8", errors="replace"))
        del buffer[:cut]


class ChildProcess:
    """A running `sh -c` command leading its own process group (pid == pgid)."""

    def __init__(
        self,
        pid: int,
        exited: asyncio.Future[int],
        gone: asyncio.Future[None],
        readers: list[asyncio.Task[None]],
    ) -> None:
        self.pid = pid
        self.started_at = time.monotonic()
        self._exited = exited
        self._gone = gone
        self._readers = readers

    @property
    def exit_code(self) -> int | None:
        """None while the shell runs; a negative signal number if a signal killed it."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def wait_group_gone(self) -> None:
        """Until every process of the group has exited and been reaped."""
        await asyncio.shield(self._gone)

    async def output_closed(self) -> None:
        """Until stdout and stderr are both at EOF and every line has been delivered."""
        await asyncio.gather(*(asyncio.shield(reader) for reader in self._readers))

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    async def stop(self, grace: float) -> bool:
        """SIGTERM the group, SIGKILL it if any process outlives `grace`; return once it is
        gone, True if it took a SIGKILL."""
        if not self._signal_group(signal.SIGTERM):
            return False
        self._signal_group(signal.SIGCONT)  # a stopped process would never see the SIGTERM
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.wait_group_gone()
                return False
        if self._signal_group(signal.SIGKILL):
            await self.wait_group_gone()
            return True
        return False

    def _signal_group(self, signum: int) -> bool:
        """Signal every process of the group; False if the group is gone."""
        # Once gone, the number may be reused by an unrelated group: never signal it again.
        if self._gone.done():
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            self._gone.set_result(None)
            return False
        return True


def spawn(
    command: str,
    env: Mapping[str, str],
    *,
    reaper: Reaper,
    on_line: OnLine,
    user: int | None = None,
) -> ChildProcess:
    """Start `sh -c command` in a new session with exactly `env`, as `user` if given (the
    caller must be root to switch); lines go to `on_line`."""
    loop = asyncio.get_running_loop()
    if not reaper.installed:
        raise RuntimeError("Reaper.install() must be called before spawning")
    group, groups = _groups_of(user) if user is not None else (None, None)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        # subprocess's fork_exec, not asyncio's subprocess: the Reaper alone must own
        # SIGCHLD and waitpid, which uvloop's libuv child handling would fight over. It also
        # switches user and groups in the child, between fork and exec.
        process = subprocess.Popen(
            ["sh", "-c", command],
            executable="/bin/sh",
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out_write,
            stderr=err_write,
            start_new_session=True,
            restore_signals=True,  # SIGPIPE and SIGXFSZ, which Python ignores, to defaults
            user=user,
            group=group,
            extra_groups=groups,
        )
    except BaseException:
        for fd in (out_read, err_read):
            os.close(fd)
        raise
    finally:
        # Only the child may hold the write ends, or the pipes never reach EOF.
        for fd in (out_write, err_write):
            os.close(fd)
    # The Reaper waits for it: with an exit status, the Popen object never calls waitpid
    # (which would take the status from the Reaper) and never warns when collected.
    process.returncode = 0
    pid = process.pid
    exited, gone = reaper.track(pid)
    readers = [
        _read_lines(loop, "stdout", out_read, on_line),
        _read_lines(loop, "stderr", err_read, on_line),
    ]
    return ChildProcess(pid, exited, gone, readers)


def _groups_of(user: int) -> tuple[int, list[int]]:
    """The primary and supplementary groups `user` gets, as `docker run --user` gives them:
    from /etc/passwd and /etc/group when the user is there, else group 0 alone."""
    try:
        entry = pwd.getpwuid(user)
    except KeyError:
        return 0, []
    return entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


def _read_lines(
    loop: asyncio.AbstractEventLoop, stream: str, fd: int, on_line: OnLine
) -> asyncio.Task[None]:
    """Deliver the pipe's lines to `on_line`; the task ends after the last one, at EOF."""
    closed: asyncio.Future[None] = loop.create_future()
    pipe = open(fd, "rb", buffering=0)  # noqa: SIM115 -- the transport closes it at EOF

    async def read() -> None:
        await loop.connect_read_pipe(lambda: _LineProtocol(stream, on_line, closed), pipe)
        await closed

    return loop.create_task(read())


class RestartBackoff:
    """Delays between restarts (doubling, capped) and the give-up rule; pure bookkeeping."""

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 30.0,
        give_up_after: int = 5,
        reset_after: float = 60.0,
    ) -> None:
        if initial <= 0 or maximum < initial or give_up_after < 1:
            raise ValueError("need 0 < initial <= maximum and give_up_after >= 1")
        self.initial = initial
        self.maximum = maximum
        self.give_up_after = give_up_after
        # a child that stays ready this long was healthy: its exit starts the delays afresh
        # (sooner, a server that crashes a while after each start would restart in a tight loop)
        self.reset_after = reset_after
        self._delay = initial
        self._exits_never_ready = 0

    def next_delay(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def record_exit(self, ready_for: float | None) -> bool:
        """Count an exit of a child that had been ready for `ready_for` seconds (None: never);
        True when `give_up_after` exits in a row never became ready."""
        if ready_for is None:
            self._exits_never_ready += 1
            return self._exits_never_ready >= self.give_up_after
        self._exits_never_ready = 0
        if ready_for >= self.reset_after:
            self._delay = self.initial
        return False
