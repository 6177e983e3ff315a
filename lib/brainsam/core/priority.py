"""Background work that leaves the CPU to interactive requests.

Scoring (registrations, precomputed embeddings) and training run in processes of their own on
the cores the server answers clicks on. Linux's SCHED_IDLE class runs a thread only on a core
that nothing else wants: a click preempts it at once, and it still uses every idle cycle, so
background work can keep all its threads. (A nice value only shrinks a thread's share: at nice
19 it still takes ~1.5 % against each busy thread, and at nice 10 ~10 %.) Linux sets the class
per thread, and a new thread inherits its creator's: every thread of the process is set, so
the thread pools torch, ITK and OpenMP start later inherit it.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

NICENESS = 19
"""Where SCHED_IDLE is unavailable (not Linux): the lowest priority a nice value gives."""


def run_in_background() -> str:
    """Put every thread of this process in SCHED_IDLE (else at nice 19); return which took."""
    threads = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [str(os.getpid())]
    try:
        for thread in threads:
            try:
                os.sched_setscheduler(int(thread), os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:  # the thread ended meanwhile
                continue
        return "SCHED_IDLE"
    except (AttributeError, OSError) as error:  # no SCHED_IDLE here, or not permitted
        logger.info("background: SCHED_IDLE unavailable (%s), nice %d instead", error, NICENESS)
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
        return f"nice {NICENESS}"
