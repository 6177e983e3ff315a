"""MONAI Label's task subprocesses (scoring, training) yield the CPU to the server's clicks."""

import logging
import sys

from brainsam.core.priority import run_in_background

logger = logging.getLogger(__name__)

TASK_MODULE = "monailabel.interfaces.utils.app"  # what MONAI Label runs scoring and training subprocesses as


def lower_priority(task: str) -> None:
    """In MONAI Label's task subprocess, run `task` in the background (brainsam.core.priority: a
    click preempts it at once; idle cores it keeps using, with all its threads). Run
    synchronously inside the server (`run_sync`), the server keeps its priority."""
    main = getattr(sys.modules["__main__"], "__spec__", None)
    if getattr(main, "name", None) != TASK_MODULE:
        logger.info("%s: running inside the server process, priority left unchanged", task)
        return
    logger.info("%s: running in the background (%s)", task, run_in_background())
