"""Starting hivemind's background processes (DHT node, averager) with a bound on how long that may take.

hivemind's ``run_in_background`` waits for the child's "ready" report with no timeout: a child that dies before
reporting (killed, crashed outside Python's exceptions) or hangs while starting leaves its parent blocked forever
(seen once in CI: a DHT node start that never returned). :func:`await_ready` bounds that wait, and a child started
with :func:`install_stack_dumps` prints where it was stuck before it is killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import psutil

logger = logging.getLogger(__name__)

STACK_DUMP_SIGNAL = signal.SIGUSR1


class StartStalled(RuntimeError):
    """A background process exited, or did not report ready in time, without saying why."""


class BackgroundProcess(Protocol):
    """What hivemind's ``DHT`` and ``DecentralizedAverager`` both are: an ``mp.Process`` with a ready report."""

    pid: int | None
    exitcode: int | None

    def wait_until_ready(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None: ...


Process = TypeVar("Process", bound=BackgroundProcess)


def _print_task_stacks(signum: int, frame) -> None:
    """Print each asyncio task's chain of awaits, outermost first (``Task.print_stack`` shows only one frame)."""
    # every loop's tasks: hivemind's averager runs its loop in a thread, not in the main one that gets the signal
    tasks = [task for task in list(getattr(asyncio.tasks, "_all_tasks", ())) if not task.done()]
    lines = []
    for task in tasks:
        lines.append(f"Task {task.get_name()} (awaits, outermost first):")
        awaitable = task.get_coro()
        while awaitable is not None:
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
            if frame is not None:
                lines.append(
                    f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}'
                )
            awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    print("\n".join(lines), file=sys.stderr, flush=True)


def install_stack_dumps() -> None:
    """Make this process print, on ``SIGUSR1``, the stacks of all its threads at once and, as soon as its event loop
    runs Python code again, the awaits of all its asyncio tasks: a stalled start is usually an awaited call that
    never returns, which thread stacks do not show. Call it first thing in the child's ``run``."""
    signal.signal(STACK_DUMP_SIGNAL, _print_task_stacks)
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True, chain=True)


def kill_process_tree(processes: list[psutil.Process]) -> None:
    """Kill these processes and reap them (those that are our children)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=5)


def _tree(pid: int | None) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except (psutil.NoSuchProcess, ValueError):
        return []


def await_ready(process: BackgroundProcess, timeout: float, what: str) -> None:
    """Wait until a started background process reports ready.

    A process that exits first raises at once. One still not ready after ``timeout`` seconds is sent
    ``SIGUSR1`` (which prints its stacks if it ran :func:`install_stack_dumps`, and ends it otherwise), then killed
    together with everything it started (its p2p daemons), and raises.

    :raises StartStalled: the process exited or stalled; a stalled one is killed with everything it started (a
        process that exited by itself may have left its daemons behind)
    :raises Exception: what the process itself reported while starting (e.g. no initial peer answered)
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            process.wait_until_ready(timeout=0.5)
            return
        except concurrent.futures.TimeoutError:
            pass
        if not process.is_alive():
            raise StartStalled(f"the {what} process exited with code {process.exitcode} before it was ready")
        if time.monotonic() >= deadline:
            tree = _tree(process.pid)  # before the signal: a process that ends on it orphans its daemons
            try:
                os.kill(process.pid, STACK_DUMP_SIGNAL)
                time.sleep(1.0)
            except ProcessLookupError:
                pass
            kill_process_tree(tree)
            process.join(timeout=5)
            raise StartStalled(
                f"the {what} process was not ready after {timeout:.0f}s (its stacks are above)"
            )


def start_in_background(process: Process, timeout: float, what: str) -> Process:
    """Start ``process`` (built with ``start=False``) and wait until it is ready (:func:`await_ready`)."""
    process.run_in_background(await_ready=False)
    await_ready(process, timeout, what)
    return process


def start_retrying(make: Callable[[], Process], timeout: float, what: str, attempts: int = 2) -> Process:
    """Build and start a process with ``make``; one that stalls or exits while starting is built and started again,
    up to ``attempts`` times. :raises StartStalled: from the last attempt"""
    for attempt in range(1, attempts + 1):
        try:
            return start_in_background(make(), timeout, what)
        except StartStalled as error:
            if attempt == attempts:
                raise
            logger.warning(f"{error}; starting it again")
    raise AssertionError("unreachable")
