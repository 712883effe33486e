"""Thread caps for the analysis step: the default, the environment override, and that the cap applies."""

from __future__ import annotations

import numpy as np
import pytest
from lalm_probe.core import threads
from lalm_probe.core.errors import UserError
from threadpoolctl import threadpool_info


def _max_threads() -> int:
    return max(p["num_threads"] for p in threadpool_info())


def test_default_is_half_the_cores_between_one_and_four(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    for cores, cap in ((1, 1), (2, 1), (4, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(threads, "usable_cores", lambda cores=cores: cores)
        assert threads.thread_cap() == cap


def test_environment_sets_the_cap(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.thread_cap() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(UserError, match=threads.ENV):
            threads.thread_cap()


def test_cap_applies_inside_the_block_only(monkeypatch):
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure a BLAS pool is loaded
    monkeypatch.setenv(threads.ENV, "1")
    before = _max_threads()
    with threads.analysis_threads() as n:
        assert n == 1 and _max_threads() == 1

    @threads.capped
    def work() -> int:
        return _max_threads()

    assert work() == 1 and work.__name__ == "work"
    assert _max_threads() == before
