"""Keeps the service's processes running: ``llamachat-serve`` starts the core
and the gateway under a ``Supervisor``.

A process that exits when nobody asked it to (a segfault, an OOM kill, ``kill
-9``, an unhandled error, the core exiting 1 because its scheduler died) is
started again after a backoff that doubles with each recent crash
(``RESTART_BACKOFF_S`` up to ``RESTART_BACKOFF_MAX_S``). After
``RESTART_MAX_CRASHES`` crashes of one process within ``RESTART_WINDOW_S``, or
an exit with status 2 (the process refused its settings or files: retrying
cannot help), the supervisor gives up: it says why in one line, stops the
other process, and exits 1. Each start tells the process how often it was
restarted (``SUPERVISOR_RESTARTS``), which its metrics show.

Every child holds the read end of a pipe whose write end only the
supervisor holds (``llamachat_process.parent``), so the children end when
the supervisor does, however it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .parent import PARENT_FD_VARIABLE

RESTARTS_VARIABLE = "SUPERVISOR_RESTARTS"
# The exit status of a process that refused its settings or files.
CONFIGURATION_ERROR = 2
# Past the processes' own drain (SHUTDOWN_GRACE_S), how long they get to exit.
STOP_MARGIN_S = 20.0

log = logging.getLogger("llamachat.supervisor")


class RestartPolicy(BaseSettings):
    """When a process that exited is started again, and when not."""

    model_config = SettingsConfigDict(env_prefix="restart_", case_sensitive=False, extra="ignore")

    max_crashes: int = Field(
        default=5,
        ge=1,
        description="Crashes of one process within RESTART_WINDOW_S after which "
        "llamachat-serve gives up and exits 1.",
    )
    window_s: float = Field(default=60.0, gt=0, description="See RESTART_MAX_CRASHES.")
    backoff_s: float = Field(
        default=0.5, ge=0, description="Wait before the first restart; doubles per recent crash."
    )
    backoff_max_s: float = Field(default=10.0, ge=0, description="Longest wait before a restart.")

    def backoff(self, recent_crashes: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, recent_crashes - 1))


def describe_exit(returncode: int) -> str:
    """``killed by SIGSEGV`` or ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class SupervisedProcess:
    """One command, started again when it exits unexpectedly."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        policy: RestartPolicy,
        parent_fd: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._command = list(command)
        self._env = env
        self._policy = policy
        self._parent_fd = parent_fd
        self._clock = clock
        self._crashes: deque[float] = deque()
        self._restart_at: float | None = None
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **self._env,
            PARENT_FD_VARIABLE: str(self._parent_fd),
            RESTARTS_VARIABLE: str(self.restarts),
        }
        self.process = subprocess.Popen(self._command, env=env, pass_fds=(self._parent_fd,))

    def check(self) -> str | None:
        """Look at the process: note an exit, restart it when its backoff is
        over. Returns why to give up, or ``None``."""
        process = self.process
        if process is None or process.poll() is None:
            return None
        now = self._clock()
        if self._restart_at is None:
            how = describe_exit(process.returncode)
            if process.returncode == CONFIGURATION_ERROR:
                return f"the {self.name} {how} (its settings or files are wrong: see its log above)"
            self._crashes.append(now)
            while self._crashes and self._crashes[0] < now - self._policy.window_s:
                self._crashes.popleft()
            if len(self._crashes) >= self._policy.max_crashes:
                return (
                    f"the {self.name} crashed {len(self._crashes)} times in "
                    f"{self._policy.window_s:g} s (last: {how})"
                )
            delay = self._policy.backoff(len(self._crashes))
            log.warning("the %s %s; restarting it in %.1f s", self.name, how, delay)
            self._restart_at = now + delay
        if now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self.start()
            assert self.process is not None  # set by start()
            log.warning(
                "restarted the %s (restart %d, pid %d)", self.name, self.restarts, self.process.pid
            )
        return None


class Supervisor:
    """Processes started together, restarted apart, stopped together."""

    POLL_S = 0.2

    def __init__(self, policy: RestartPolicy, stop_timeout_s: float) -> None:
        self._policy = policy
        self._stop_timeout_s = stop_timeout_s
        # The write end stays open, unwritten, until this process ends.
        self._parent_read, self._parent_write = os.pipe()
        self.processes: list[SupervisedProcess] = []

    def add(self, name: str, command: Sequence[str], env: dict[str, str]) -> None:
        supervised = SupervisedProcess(name, command, env, self._policy, self._parent_read)
        self.processes.append(supervised)
        supervised.start()

    def run(self, stopping: Callable[[], bool]) -> str | None:
        """Supervise until ``stopping()`` or a reason to give up (returned)."""
        while not stopping():
            for supervised in self.processes:
                if (reason := supervised.check()) is not None:
                    return reason
            time.sleep(self.POLL_S)
        return None

    def stop_all(self) -> list[int]:
        """SIGTERM to every process, then SIGKILL to those still running after
        the stop timeout; returns their exit statuses (one that had crashed
        and waited for its restart keeps the status it crashed with)."""
        running = [s.process for s in self.processes if s.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        os.close(self._parent_write)
        os.close(self._parent_read)
        return [process.returncode for process in running]
