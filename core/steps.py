"""What happens at decode step t, decided in one place.

Step 1 is the prompt pass: the whole prompt is computed and it predicts the first new token (seed 002's "first
decoding step"). With a KV cache every later step computes only the newest position. Hence:

- a stack that runs once per input (an encoder, cross-attention keys and values) is read and edited at step 1 only;
- a read at a plain position (``last``, ``mean``, a span) runs at step 1, ``step:t`` at step t, ``prefix:t`` at every
  step up to t (a running mean over the decoder positions);
- an edit runs at its ``steps`` (every step when unset); after step 1 it can only touch the new position, so one at
  ``last`` or ``all`` applies to each generated position (seed 002's forcing) and one at a span or ``token:i``, which
  lies in the prompt, is not applied again.
"""

from __future__ import annotations

from typing import Sequence

Steps = tuple[int, ...] | None  # None: every step


def step_of(selector: str) -> tuple[int, bool] | None:
    """``(t, pooled)`` for ``step:<t>`` / ``prefix:<t>`` selectors, None for positions in one forward pass."""
    kind, _, num = selector.partition(":")
    if kind not in ("step", "prefix"):
        return None
    return int(num), kind == "prefix"


def read_steps(selector: str, once: bool) -> Steps:
    """The decode steps at which a read of ``selector`` runs."""
    step = step_of(selector)
    if step is None or once:
        return (1,)
    t, pooled = step
    return tuple(range(1, t + 1)) if pooled else (t,)


def edit_steps(steps: Sequence[int] | None, once: bool) -> Steps:
    """The decode steps at which an edit runs: step 1 only on a stack that runs once, else ``steps`` (None: all)."""
    if once:
        return (1,) if steps is None or 1 in steps else ()
    return None if steps is None else tuple(steps)


def last_step(ops_steps: Sequence[Steps]) -> int | None:
    """The last step any op needs (None when one runs at every step)."""
    if any(s is None for s in ops_steps):
        return None
    return max((max(s) for s in ops_steps if s), default=1)


def follows_generation(selector: str) -> bool:
    """Whether an edit at ``selector`` applies to each newly generated position after step 1."""
    return selector in ("last", "all")


def new_position(time_len: int) -> tuple[int, int]:
    """``[start, end)`` of the one position computed at a step after the prompt pass."""
    return time_len - 1, time_len
