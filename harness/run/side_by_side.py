"""Independent runs `jobs` at a time in worker threads (calibrate's and equivalence's seeds), and
stopped as one: SIGTERM/Ctrl-C reach only the main thread, so on KeyboardInterrupt no queued run
starts and every running training is stopped as Ctrl-C stops one (train.stop_trainings) before the
interrupt goes on -- never a pool that keeps launching seeds after its deadline, nor trainings
orphaned when the caller's timeout follows up with SIGKILL."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from harness.run import train

T = TypeVar("T")
R = TypeVar("R")


def run_all(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """[fn(item) for item in items], `jobs` at once, in order."""
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        return list(pool.map(fn, items))
    except KeyboardInterrupt:
        train.stop_trainings()
        pool.shutdown(wait=True, cancel_futures=True)  # the running ones end within ~30 s
        train.resume_trainings()
        raise
    finally:
        pool.shutdown(wait=True)
