"""The supervisor of llamachat-serve on real short-lived processes."""

from __future__ import annotations

import signal
import sys
import time

from llamachat_process.supervisor import RestartPolicy, Supervisor, describe_exit

FAST = RestartPolicy(max_crashes=3, window_s=30, backoff_s=0.05, backoff_max_s=0.2)


def test_backoff_doubles_per_recent_crash_up_to_its_cap():
    policy = RestartPolicy(backoff_s=0.5, backoff_max_s=3)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_exits_are_described_by_signal_or_status():
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with status 1"


def test_a_process_that_crashes_at_every_start_is_given_up_on():
    supervisor = Supervisor(FAST, stop_timeout_s=10)
    try:
        supervisor.add("core", [sys.executable, "-c", "import os; os.abort()"], {})
        reason = supervisor.run(lambda: False)
    finally:
        supervisor.stop_all()
    assert reason == "the core crashed 3 times in 30 s (last: killed by SIGABRT)"
    assert supervisor.processes[0].restarts == 2


def test_status_2_means_bad_settings_and_is_not_retried():
    supervisor = Supervisor(FAST, stop_timeout_s=10)
    try:
        supervisor.add("core", [sys.executable, "-c", "raise SystemExit(2)"], {})
        reason = supervisor.run(lambda: False)
    finally:
        supervisor.stop_all()
    assert reason is not None and "exited with status 2" in reason
    assert supervisor.processes[0].restarts == 0


def test_a_crashed_process_is_restarted_and_told_how_often():
    supervisor = Supervisor(FAST, stop_timeout_s=10)
    # Exits 1 on its first start, then runs (the restart count comes in its environment).
    script = (
        "import os, sys, time\n"
        "sys.exit(1) if os.environ['SUPERVISOR_RESTARTS'] == '0' else time.sleep(60)"
    )
    deadline = time.monotonic() + 10
    try:
        supervisor.add("gateway", [sys.executable, "-c", script], {})
        reason = supervisor.run(
            lambda: supervisor.processes[0].restarts == 1 or time.monotonic() > deadline
        )
        process = supervisor.processes[0].process
        assert process is not None
        time.sleep(0.3)
        assert reason is None and process.poll() is None
    finally:
        codes = supervisor.stop_all()
    assert codes == [-signal.SIGTERM]
