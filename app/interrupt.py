"""The one path of Ctrl-C (SIGINT), installed before any heavy import.

It says how far the sweep got, stops every process the run started (Grain's and joblib's
workers), and leaves at once with the shell's status 130. No exception unwinds through JAX,
XLA or a garbage-collection callback (where it could be swallowed, or the interpreter crash
at teardown): records, caches and reports are written atomically and locks die with their
process, so nothing is half-made. This module imports only the standard library at import
time: Ctrl-C during the seconds of imports takes the same path.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

INTERRUPTED = 130  # the shell's exit status for Ctrl-C
# set by the sweep callback: jobs counted in this process, the sweep's size, the folder where
# every job (whatever process runs it) writes its outcome, and the output folder
PROGRESS: dict[str, Any] = {"done": 0, "total": None, "sweep_dir": None, "output_dir": None}
# multiprocessing's resource tracker outlives the workers stopped on Ctrl-C and frees their
# semaphores and shared memory; its "leaked objects" warning is then expected noise
TRACKER_WARNING = "ignore:resource_tracker:UserWarning"
WORKER_PYTHON = Path(__file__).with_name("worker_python")  # this Python, ignoring SIGINT


def finished_on_disk() -> int:
    """Jobs of the sweep that wrote their outcome (those run by other processes included)."""
    sweep_dir = PROGRESS["sweep_dir"]
    if sweep_dir is None:
        return 0
    from core.records import OUTCOME_NAME  # imported by then: the sweep has started

    return len(list(Path(sweep_dir).glob(f"*/{OUTCOME_NAME}")))


def interrupted_message() -> str:
    """One line: how far a sweep got and how to resume it."""
    done, total = max(PROGRESS["done"], finished_on_disk()), PROGRESS["total"]
    where = f" after {done} of {total if total is not None else '?'} cells" if total or done else ""
    return f"interrupted{where}; re-run the same command to resume (finished cells are kept)."


def stop_child_processes() -> None:
    """Kill every process this one started (data workers, joblib's loky workers), children
    first; resource trackers are left to free what the workers held and exit by themselves."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 (psutil missing or /proc unreadable: nothing to stop)
        return
    for child in reversed(children):
        try:
            if "resource_tracker import main" not in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:  # already gone
            pass


def stop_on_interrupt(signum: int, frame: Any) -> None:
    """The SIGINT handler: message, stop the workers, exit 130."""
    print(f"\n{interrupted_message()}", file=sys.stderr, flush=True)
    stop_child_processes()
    sys.stdout.flush()
    os._exit(INTERRUPTED)


def install() -> None:
    """Make Ctrl-C take ``stop_on_interrupt`` in this (the main) process, and start worker
    processes (Grain's) deaf to it: the terminal sends it to the whole process group, and a
    worker interrupted while it starts would print a traceback of its own."""
    if TRACKER_WARNING not in sys.warnoptions:  # passed on to the resource tracker it starts
        sys.warnoptions.append(TRACKER_WARNING)
    os.environ["L2D_WORKER_PYTHON"] = sys.executable
    multiprocessing.set_executable(str(WORKER_PYTHON))
    signal.signal(signal.SIGINT, stop_on_interrupt)

