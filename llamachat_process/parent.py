"""No orphans: a process started by ``llamachat-serve`` ends when it dies.

The supervisor keeps the write end of a pipe that it never writes to, and
hands each child the read end (its number in ``LLAMACHAT_PARENT_FD``). The
kernel closes the write end when the supervisor ends for any reason, ``kill
-9`` included; the child's watcher thread then reads end-of-file, and the
child stops as on SIGTERM, or at once if that has not ended it in time. A pipe
works on every POSIX system, where Linux's parent-death signal would not.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

PARENT_FD_VARIABLE = "LLAMACHAT_PARENT_FD"

log = logging.getLogger(__name__)


def watch_parent(grace_s: float) -> None:
    """If a supervisor started this process, end it when the supervisor ends:
    SIGTERM first (an orderly stop), and exit after ``grace_s`` more seconds if
    it is still running. Does nothing in a process started otherwise."""
    fd = os.environ.pop(PARENT_FD_VARIABLE, None)
    if fd is None:
        return
    try:
        descriptor = int(fd)
        os.fstat(descriptor)
    except (ValueError, OSError):
        log.warning("%s=%r names no open file; not watching the parent", PARENT_FD_VARIABLE, fd)
        return
    threading.Thread(
        target=_stop_when_closed, args=(descriptor, grace_s), name="parent-watch", daemon=True
    ).start()


def _stop_when_closed(descriptor: int, grace_s: float) -> None:
    while True:
        try:
            if not os.read(descriptor, 4096):
                break  # end of file: the supervisor is gone
        except InterruptedError:
            continue
        except OSError:
            break
    log.warning("the supervising process ended; stopping")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    log.error("still running %gs after the supervisor ended; exiting", grace_s)
    os._exit(1)
