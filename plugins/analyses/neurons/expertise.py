"""Per-unit expertise: average precision of every unit for one binary label, and its forcing values.

Seed 002 §3.3 ranks each neuron by ``AP(neuron response, binary language label)``, following Kojima et al. 2024
and Cuadros et al. 2022 (``selfcond``); the released code calls ``sklearn.metrics.average_precision_score`` once
per unit. Here every unit of an ``(items, units)`` matrix is scored at once, with values equal to sklearn's:

- AP = sum over the *distinct* scores s, from the highest, of (R(s) - R(s_prev)) * P(s), where P and R are the
  precision and recall of "score >= s"; no interpolation. Items tied at a score enter together, so each positive
  contributes the precision at the *end* of its tie group (sklearn's ``_binary_clf_curve`` thresholds are the
  distinct values). A constant unit scores the positive rate; with no positive item AP is 0.0 (sklearn returns
  0.0 and warns); NaN or infinite scores raise ``ValueError`` as sklearn does. ``-0.0`` and ``0.0`` tie.
- How: a chunk of units is transposed to ``(units, items)`` and each score is turned into an order-preserving
  integer key with the label in its lowest bit, so one ``np.sort`` of int64 keys (cheaper than ``np.argsort``)
  brings scores and labels into order together, with no gather. Tie groups are the runs of equal keys (label
  bit ignored). In ascending order a positive's precision is "positives from its group's first item on" over
  "items from there on"; only the few positives that share their score (common after bf16 rounding) need to
  look up their group's first item. float64 scores that are not exactly float32 fall back to ``argsort`` plus
  gathers. With ``device`` set (``"cuda"``, ``"cpu"``), the same steps run in torch (``torch.sort``) there.
- Memory: units are processed ``chunk`` at a time, so a ``np.memmap`` of 20k items x 100k units never has to
  fit in memory: peak extra memory is about 50 bytes x items x chunk (default chunk: 2**21 elements / items,
  ~100 MiB), whatever the number of units.

Forcing values (Kojima's ``ExpertiseResult.build``, kept by the released code): ``on_p50`` and ``on_p90`` are
NumPy 'linear' percentiles over the positive items (the median is what median-value patching writes),
``off_mean`` (float64 accumulation, so it agrees with ``np.mean`` to the input's rounding) and ``off_p50`` are
over the negatives. They come from the same chunk read: ``np.percentile`` (scalar q, like the reference) on each
side's scores, taken already sorted from the AP step (a percentile depends only on the values, so this equals
``np.percentile`` of the raw responses bit for bit, and partitions sorted data ~5x faster). The chunk keeps its
float dtype (float16 is promoted to float32). An empty side gives NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK_ELEMENTS = 2**21  # items x units per chunk by default
_FLIP = np.int32(0x7FFFFFFF)


@dataclass(frozen=True)
class Expertise:
    """Per-unit statistics of one site for one binary label (arrays of length ``units``, float64)."""

    ap: np.ndarray
    on_p50: np.ndarray
    on_p90: np.ndarray
    off_mean: np.ndarray
    off_p50: np.ndarray
    positives: int
    negatives: int


def average_precision(responses: Any, labels: Any, *, chunk: int | None = None, device: Any = None) -> np.ndarray:
    """AP of every column of ``responses`` (items x units) for binary ``labels``; equals sklearn per unit."""
    return _scan(responses, labels, chunk=chunk, device=device, forcing=False).ap


def unit_expertise(responses: Any, labels: Any, *, chunk: int | None = None, device: Any = None) -> Expertise:
    """AP and forcing values of every unit, from one chunked pass over ``responses`` (items x units)."""
    return _scan(responses, labels, chunk=chunk, device=device, forcing=True)


# ---- the chunked pass ---------------------------------------------------------------------------------------
def _scan(responses: Any, labels: Any, *, chunk: int | None, device: Any, forcing: bool) -> Expertise:
    x = responses if hasattr(responses, "shape") and hasattr(responses, "__getitem__") else np.asarray(responses)
    if len(x.shape) != 2:
        raise ValueError(f"responses must be a 2-D (items, units) array, got shape {tuple(x.shape)}.")
    n, units = int(x.shape[0]), int(x.shape[1])
    if n == 0:
        raise ValueError("responses has no items.")
    y = binary_labels(labels, n)
    pos = y.astype(bool)
    p = int(y.sum())
    step = int(chunk) if chunk else max(1, CHUNK_ELEMENTS // n)
    if step < 1:
        raise ValueError(f"chunk must be a positive number of units, got {chunk}.")
    out = {name: np.full(units, np.nan) for name in ("ap", "on_p50", "on_p90", "off_mean", "off_p50")}
    for a in range(0, units, step):
        b = min(units, a + step)
        xt = _float_block(np.asarray(x[:, a:b]), first_unit=a)
        if device is not None and xt.dtype == np.float32:
            out["ap"][a:b] = _ap_torch(xt, y, p, device) if p else 0.0
            sides = (xt[:, pos], xt[:, ~pos])  # forcing values on the CPU, from the unsorted chunk
        else:
            out["ap"][a:b], *sides = _ap_numpy(xt, y, p, sides=forcing)
        if forcing:
            _forcing(*sides, out, a, b)
    return Expertise(positives=p, negatives=n - p, **out)


def binary_labels(labels: Any, n: int) -> np.ndarray:
    """Labels as int64 0/1 of length ``n``; anything but bool or {0, 1} is refused (one value against the rest)."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have one entry per item ({n}), got shape {y.shape}.")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (bool or 0/1): 1 for the target value, 0 for the rest.")
    return y.astype(np.int64)


def _float_block(block: np.ndarray, first_unit: int) -> np.ndarray:
    """The chunk as a C-contiguous (units, items) float array: float32 when exact, else float64; all finite."""
    if block.dtype in (np.float32, np.float16):
        xt = np.ascontiguousarray(block.T, dtype=np.float32)
    else:
        xt = np.ascontiguousarray(block.T, dtype=np.float64)
        x32 = xt.astype(np.float32)
        if np.array_equal(x32, xt):  # every value is a float32: take the fast packed-key path
            xt = x32
    finite = np.isfinite(xt).all(axis=1)
    if not finite.all():
        raise ValueError(f"responses contain NaN or infinity (unit {first_unit + int(np.argmin(finite))}).")
    return xt


def _forcing(on: np.ndarray, off: np.ndarray, out: dict[str, np.ndarray], a: int, b: int) -> None:
    """Forcing values of units a..b from their positive and negative responses (rows = units, any order).

    Each percentile is its own ``np.percentile`` call with a scalar q, as in Kojima's code: with a list of q,
    NumPy returns float64 computed differently from the float32 result of a scalar q.
    """
    if on.shape[1]:
        out["on_p50"][a:b] = np.percentile(on, 50, axis=1, overwrite_input=True)
        out["on_p90"][a:b] = np.percentile(on, 90, axis=1, overwrite_input=True)
    if off.shape[1]:
        out["off_mean"][a:b] = off.mean(axis=1, dtype=np.float64)
        out["off_p50"][a:b] = np.percentile(off, 50, axis=1, overwrite_input=True)


# ---- AP of one chunk --------------------------------------------------------------------------------------
def _ap_numpy(xt: np.ndarray, y: np.ndarray, p: int, sides: bool) -> tuple[np.ndarray, ...]:
    """AP of each row of ``xt`` (units, items); with ``sides``, also each row's positive and negative scores."""
    c, n = xt.shape
    if xt.dtype == np.float32:
        keys = _keys(xt, y)
        keys.sort(axis=1)
        keys = keys.ravel()
        lab = keys & 1
        keys >>= 1  # the score's key alone: equal keys are one tie group
        values = keys
    else:  # float64 that float32 cannot hold: argsort, then gather scores and labels
        order = np.argsort(xt, axis=1)
        values = np.take_along_axis(xt, order, axis=1).ravel()
        lab = y[order].ravel()
    start = np.empty(c * n + 1, dtype=bool)  # start[i]: item i is the first of its tie group; start[c*n] closes
    np.not_equal(values[1:], values[:-1], out=start[1:-1])
    start[:: n] = True  # every unit's first item starts a group (units never share one), and the sentinel
    is_pos = lab.astype(bool)
    q = np.flatnonzero(is_pos)  # the positives: p per unit, ascending
    ap = _ap_from_groups(start, lab, q, c, n, p) if p else np.zeros(c)
    if not sides:
        return (ap,)
    on, off = values[q], values[np.flatnonzero(~is_pos)]
    if xt.dtype == np.float32:
        on, off = _floats(on), _floats(off)
    return ap, on.reshape(c, p), off.reshape(c, n - p)


def _keys(xt: np.ndarray, y: np.ndarray) -> np.ndarray:
    """int64 keys whose order is the float order of the scores, with each item's label in bit 0."""
    bits = (xt + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into +0.0: both zeros tie, as in sklearn
    bits ^= (bits >> 31) & _FLIP  # negative floats: flip the magnitude bits so that integer order = float order
    keys = bits.astype(np.int64)
    keys <<= 1
    keys |= y
    return keys


def _floats(keys: np.ndarray) -> np.ndarray:
    """Back from score keys to float32 scores (the inverse of ``_keys`` without the label bit)."""
    bits = keys.astype(np.int32)
    bits ^= (bits >> 31) & _FLIP
    return bits.view(np.float32)


def _ap_from_groups(start: np.ndarray, lab: np.ndarray, q: np.ndarray, c: int, n: int, p: int) -> np.ndarray:
    """AP per unit from the flat ascending order; ``start`` marks the first item of each tie group.

    Each positive scores the precision of "score >= its group's score": the positives at or above the group
    over the items at or above it, i.e. everything from the group's first item on. Positives that share their
    score with another item (rare in float32, common in bf16) look up their group's first item.
    """
    s = q.copy()
    tied = ~(start[q] & start[q + 1])
    count = int(np.count_nonzero(tied))
    if count:
        firsts = np.flatnonzero(start[:-1])
        if 4 * count < len(q):  # a few ties (float32): binary search for those positives only
            s[tied] = firsts[np.searchsorted(firsts, q[tied], side="right") - 1]
        else:  # mostly ties (bf16): number every group once, then look each positive's group up
            s = firsts[np.cumsum(start[:-1].view(np.int8), dtype=np.intp)[q] - 1]
    cum = np.empty(c * n + 1, dtype=np.int64)
    cum[0] = 0
    np.cumsum(lab, out=cum[1:])
    s = s.reshape(c, p)
    below = cum[s] - (np.arange(c) * p)[:, None]  # positives of the unit scoring below the group
    at_or_above = n - (s - (np.arange(c) * n)[:, None])
    return ((p - below) / at_or_above).sum(axis=1) / p


def _ap_torch(xt: np.ndarray, y: np.ndarray, p: int, device: Any) -> np.ndarray:
    """The packed-key AP on a torch device (``torch.sort``); the same steps as the NumPy path."""
    import torch

    c, n = xt.shape
    x = torch.from_numpy(xt).to(device) + 0.0
    bits = x.view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (bits.to(torch.int64) << 1) | torch.from_numpy(y).to(device)
    keys = torch.sort(keys, dim=1).values.reshape(-1)
    lab = keys & 1
    keys = keys >> 1
    start = torch.ones(c * n, dtype=torch.bool, device=keys.device)
    start[1:] = keys[1:] != keys[:-1]
    start[::n] = True
    q = torch.nonzero(lab).squeeze(1)
    s = torch.nonzero(start).squeeze(1)[torch.cumsum(start, 0)[q] - 1]
    cum = torch.zeros(c * n + 1, dtype=torch.int64, device=keys.device)
    cum[1:] = torch.cumsum(lab, 0)
    s = s.reshape(c, p)
    units = torch.arange(c, device=keys.device)[:, None]
    below = (cum[s] - units * p).double()
    ap = ((p - below) / (n - (s - units * n)).double()).sum(dim=1) / p
    return ap.cpu().numpy()
