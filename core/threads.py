"""Thread caps for the analysis step.

t-SNE (OpenMP), SVD/eigh and large matrix products (BLAS) start one thread per core by default. On a small or
shared machine, or beside a PyTorch pool that already holds the cores, these pools oversubscribe the CPU and
small problems run 10-30 times slower than on a few threads (measured on a busy 2-core machine: t-SNE of 350
points 1.7 s on one thread, 20 s on two). Analyses wrap their NumPy/scikit-learn work in :func:`analysis_threads`
(or decorate ``analyze`` with :func:`capped`), which caps every BLAS and OpenMP pool (via ``threadpoolctl``;
PyTorch's OpenMP pool included) for that block only, so model inference keeps its own settings. The cap defaults
to half the usable cores, at most 4 and at least 1, leaving room for whatever else runs;
``LALM_PROBE_THREADS=N`` sets it. Results do not depend on it beyond floating-point summation order.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from .errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
ENV = "LALM_PROBE_THREADS"
DEFAULT_MAX = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers restrict), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_cap() -> int:
    """Threads for analysis math: ``$LALM_PROBE_THREADS`` when set, else ``min(4, cores // 2)`` (at least 1)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"{ENV} must be a whole number of threads (1 or more), got '{raw}'.")
        return n
    return max(1, min(DEFAULT_MAX, usable_cores() // 2))


@contextmanager
def analysis_threads(limit: int | None = None) -> Iterator[int]:
    """Cap BLAS and OpenMP thread pools (NumPy, SciPy, scikit-learn, PyTorch's OpenMP) inside the block.

    Yields the cap. Nested blocks are fine: the inner one applies until it exits, then the outer one again.
    """
    from threadpoolctl import threadpool_limits

    n = limit or thread_cap()
    with threadpool_limits(limits=n):
        yield n


def capped(fn: F) -> F:
    """Decorator: run ``fn`` (e.g. an analysis's ``analyze``) under :func:`analysis_threads`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with analysis_threads():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
