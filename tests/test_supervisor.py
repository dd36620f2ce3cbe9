"""Tests for proxy.supervisor: real `sh -c` children, no sleeps, no mocks."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

from proxy.supervisor import MAX_LINE_BYTES, ChildProcess, Reaper, RestartBackoff, spawn

SAFETY = 5  # seconds; a safety net only, nothing waits for it to pass
ENV = {"PATH": os.environ["PATH"]}


class Output:
    """Collects (stream, line) pairs and lets a test wait for one to arrive."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._arrived = asyncio.Event()

    def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))
        self._arrived.set()

    def of(self, stream: str) -> list[str]:
        return [line for name, line in self.lines if name == stream]

    async def wait_for(self, line: str, stream: str = "stdout") -> None:
        while (stream, line) not in self.lines:
            self._arrived.clear()
            await self._arrived.wait()


Start = Callable[..., tuple[ChildProcess, Output]]


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ...; None once reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()


def group_members(pgid: int) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid:
                members.add(int(entry))
    return members


def still_listed(pids: set[int]) -> set[int]:
    """The pids still in /proc: alive, or zombies nobody has reaped."""
    return {pid for pid in pids if stat_fields(pid) is not None}


def assert_group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    yield reaper
    reaper.uninstall()


@pytest.fixture
async def start(reaper: Reaper) -> AsyncIterator[Start]:
    children: list[tuple[ChildProcess, Output]] = []

    def start(command: str, env: dict[str, str] = ENV) -> tuple[ChildProcess, Output]:
        output = Output()
        children.append((spawn(command, env, reaper=reaper, on_line=output), output))
        return children[-1]

    yield start
    # Leave nothing behind, whatever the test did.
    async with asyncio.timeout(SAFETY):
        for child, _ in children:
            child.kill()
            await child.wait_group_gone()
            await child.output_closed()


async def test_lines_are_tagged_by_stream_in_order(start: Start) -> None:
    child, output = start("echo out1; echo err1 >&2; echo out2; echo err2 >&2; printf tail")
    async with asyncio.timeout(SAFETY):
        await child.output_closed()
    assert output.of("stdout") == ["out1", "out2", "tail"]
    assert output.of("stderr") == ["err1", "err2"]


async def test_fast_bursts_on_both_streams_lose_nothing(start: Start) -> None:
    child, output = start("seq 50000 & seq 50000 >&2; wait")
    async with asyncio.timeout(SAFETY):
        await child.output_closed()
    expected = [str(n) for n in range(1, 50001)]
    assert output.of("stdout") == expected
    assert output.of("stderr") == expected


async def test_long_lines_are_cut_but_complete(start: Start) -> None:
    child, output = start(
        "head -c 200000 /dev/zero | tr '\\0' a; echo; echo after;"
        "head -c 70000 /dev/zero | tr '\\0' b"
    )
    async with asyncio.timeout(SAFETY):
        await child.output_closed()
    lines = output.of("stdout")
    assert [len(line) for line in lines] == [65536, 65536, 65536, 3392, 5, 65536, 4464]
    assert "".join(lines[:4]) == "a" * 200000
    assert lines[4] == "after"
    assert "".join(lines[5:]) == "b" * 70000


async def test_long_lines_are_not_cut_inside_a_character(start: Start) -> None:
    child, output = start(f"{sys.executable} -c \"print('é' * 40000)\"")
    async with asyncio.timeout(SAFETY):
        await child.output_closed()
    pieces = output.of("stdout")
    assert len(pieces) == 2
    assert all(len(piece.encode()) <= MAX_LINE_BYTES for piece in pieces)
    assert "".join(pieces) == "é" * 40000


@pytest.mark.parametrize(
    ("command", "code"), [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", -signal.SIGKILL)]
)
async def test_wait_returns_the_exit_code(start: Start, command: str, code: int) -> None:
    child, _ = start(command)
    async with asyncio.timeout(SAFETY):
        assert await child.wait() == code
    assert child.exit_code == code


async def test_the_environment_is_exactly_the_given_one(start: Start) -> None:
    child, output = start('echo "$FOO ${HOME-unset}"', {**ENV, "FOO": "bar baz"})
    async with asyncio.timeout(SAFETY):
        await child.output_closed()
    assert output.of("stdout") == ["bar baz unset"]


async def test_stop_ends_every_process_of_a_forking_group(start: Start) -> None:
    child, output = start("sleep 1000 & sleep 1000 & echo started; wait")
    async with asyncio.timeout(SAFETY):
        await output.wait_for("started")
        members = group_members(child.pid)
        assert len(members) >= 3
        assert child.exit_code is None
        await child.stop(grace=SAFETY)
    assert child.exit_code == -signal.SIGTERM
    assert_group_gone(child.pid)
    assert still_listed(members) == set()  # no zombie either
    await child.stop(grace=SAFETY)  # idempotent once gone
    child.kill()


async def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(start: Start) -> None:
    child, output = start("trap '' TERM; echo ready; exec sleep 1000")
    async with asyncio.timeout(SAFETY):
        await output.wait_for("ready")
        began = time.monotonic()
        await child.stop(grace=0.3)
    # it outlived its SIGTERM for the grace (less a loop tick: timers may fire a little early)
    assert time.monotonic() - began >= 0.25
    assert child.exit_code == -signal.SIGKILL
    assert_group_gone(child.pid)


async def test_stop_waits_for_a_straggler_after_the_shell_exited(start: Start) -> None:
    child, output = start("(trap '' TERM; echo ready; exec sleep 1000) & wait")
    async with asyncio.timeout(SAFETY):
        await output.wait_for("ready")
        members = group_members(child.pid)
        began = time.monotonic()
        await child.stop(grace=0.3)
    assert child.exit_code == -signal.SIGTERM  # the shell went at once, the sleep did not
    assert time.monotonic() - began >= 0.25  # the grace, less a loop tick
    assert_group_gone(child.pid)
    assert still_listed(members) == set()


async def test_an_orphaned_grandchild_is_adopted_and_reaped(start: Start) -> None:
    child, output = start("(sleep 1000 & echo $!); echo ready; exec sleep 1000")
    async with asyncio.timeout(SAFETY):
        await output.wait_for("ready")
        orphan = int(output.of("stdout")[0])
        fields = stat_fields(orphan)
        assert fields is not None
        assert int(fields[1]) == os.getpid()  # reparented to us, the subreaper
        child.kill()
        await child.wait_group_gone()
    assert child.exit_code == -signal.SIGKILL
    assert stat_fields(orphan) is None  # reaped, not a zombie


async def test_stop_after_the_group_is_gone_does_nothing(start: Start) -> None:
    child, _ = start("exit 0")
    async with asyncio.timeout(SAFETY):
        await child.wait_group_gone()
        await child.stop(grace=SAFETY)
    child.kill()
    assert child.exit_code == 0


def test_works_under_uvloop() -> None:
    async def scenario() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            output = Output()
            child = spawn(
                "seq 1000; sleep 1000 & echo started; wait", ENV, reaper=reaper, on_line=output
            )
            async with asyncio.timeout(SAFETY):
                await output.wait_for("started")
                members = group_members(child.pid)
                await child.stop(grace=SAFETY)
                await child.output_closed()
            assert output.of("stdout") == [*map(str, range(1, 1001)), "started"]
            assert child.exit_code == -signal.SIGTERM
            assert still_listed(members) == set()
        finally:
            reaper.uninstall()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


def test_backoff_doubles_up_to_the_maximum_and_resets_after_a_minute_of_readiness() -> None:
    backoff = RestartBackoff()
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    backoff.record_exit(ready_for=59.9)  # ready, but not for long: no fresh start
    assert backoff.next_delay() == 30
    backoff.record_exit(ready_for=60)
    assert [backoff.next_delay() for _ in range(2)] == [1, 2]


def test_backoff_gives_up_after_five_exits_in_a_row_never_ready() -> None:
    backoff = RestartBackoff()
    assert [backoff.record_exit(ready_for=None) for _ in range(5)] == [False] * 4 + [True]


def test_backoff_streak_is_broken_by_readiness_however_short() -> None:
    backoff = RestartBackoff(give_up_after=3)
    assert not backoff.record_exit(ready_for=None)
    assert not backoff.record_exit(ready_for=None)
    assert not backoff.record_exit(ready_for=0.0)
    assert not backoff.record_exit(ready_for=None)
    assert not backoff.record_exit(ready_for=None)
    assert backoff.record_exit(ready_for=None)


@pytest.mark.parametrize(
    ("initial", "maximum", "give_up_after"), [(0, 30, 5), (2, 1, 5), (1, 30, 0)]
)
def test_backoff_rejects_nonsense(initial: float, maximum: float, give_up_after: int) -> None:
    with pytest.raises(ValueError, match="initial"):
        RestartBackoff(initial, maximum, give_up_after)
