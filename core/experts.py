"""Each expert of a mixture-of-experts MLP as sites, when the experts are one fused module.

transformers 5 keeps a MoE layer's experts as one module (``gate_up_proj (experts, 2*I, H)``, ``down_proj
(experts, H, I)``, the ``@use_experts_implementation`` classes of Qwen3-MoE, Qwen3-Omni, Mixtral, OLMoE...) that
runs each expert on the tokens routed to it, so no module output holds expert i's activations.
:func:`tap_experts` gives such a module lazy taps (:mod:`.taps`), ``<experts>.probe_tap.<i>.<part>``, that
:func:`expert_components` declares as the components ``expert<i>_<part>`` (the vocabulary's pattern, see
:mod:`.vocab`), each read and edited as ``(batch, time, units)`` on the MoE block's own positions:

- ``gate``, ``up``: expert i's gate and up projections (the two halves of its ``gate_up_proj``), width I;
- ``act``: its hidden activation ``act(gate) * up``, the input of its down projection, width I;
- ``out``: its output, the down projection's, before the routing weight (width H): the block's output is the sum
  over a token's chosen experts of routing weight times ``out``.

A token not routed to expert i did not go through it: its rows read as zeros, and an edit there changes nothing
(the expert is not run on it). An edit at a routed token flows on through the rest of the expert and its routing
weight into the block's output. Which experts a token takes is decided by the router (``moe_router``, whose edits
re-route), before any expert site.

Cost and exactness: with none of a module's taps armed (no expert site read or edited in the pass), the module runs
its own forward, whatever implementation its config names. While one is armed, it runs that implementation as
written out here (``eager``, ``grouped_mm``, ``batched_mm``: the same operations in the same order, so with no edit
the output is bit for bit the module's own; ``tests/core/test_experts.py`` holds every implementation to that),
passing the expert's values through each armed tap, and builds a dense ``(batch, time, units)`` view for the armed
taps only. Other implementations, expert parallelism and expert layouts other than concatenated, untransposed,
gated and bias-free weights are refused with one sentence.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.integrations.moe import _batched_linear, _grouped_linear

from .errors import PluginError, UserError
from .taps import TAP, Armable, LazyTap
from .vocab import Component

PARTS = ("gate", "up", "act", "out")


class ExpertTap(torch.nn.Module):
    """The taps of one expert: ``gate``, ``up``, ``act`` (width I) and ``out`` (width H)."""

    def __init__(self, intermediate: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up, self.act = LazyTap(intermediate), LazyTap(intermediate), LazyTap(intermediate)
        self.out = LazyTap(hidden)


class ExpertTaps(torch.nn.ModuleList, Armable):
    """The taps of every expert of one fused module (``probe_tap.<i>.<part>``), armed while any of them is.

    ``batch_time``: the ``(batch, time)`` shape of the MoE block's input in the current pass (the experts see the
    tokens flattened); ``original``: the module's forward before the taps, run while none is armed.
    """

    def __init__(self, experts: int, intermediate: int, hidden: int, original: Callable) -> None:
        super().__init__([ExpertTap(intermediate, hidden) for _ in range(experts)])
        self.original = original
        self.batch_time: tuple[int, int] | None = None
        # part -> every expert's tap, as a plain list: an armed pass scans it without module attribute lookups
        self.table = {part: [getattr(tap, part) for tap in self] for part in PARTS}


def _check_layout(experts: torch.nn.Module) -> None:
    want = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
            "has_post_expert_norm": False}
    for flag, value in want.items():
        if getattr(experts, flag, value) != value:
            raise PluginError(f"{type(experts).__name__}: per-expert sites need {flag}={value}; this experts "
                              f"module has {flag}={not value}.")
    for param in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, param, None), torch.Tensor):
            raise PluginError(f"{type(experts).__name__} has no fused {param}; per-expert sites need one.")


def tap_experts(block: torch.nn.Module, name: str = "experts") -> None:
    """Give the fused experts module ``block.<name>`` a tap per expert and part (idempotent).

    The module's forward becomes :func:`_probe_forward` (an instance attribute: the class and its other instances
    are untouched); the block records its input's ``(batch, time)`` shape for the taps' layout.
    """
    experts = getattr(block, name)
    if isinstance(getattr(experts, TAP, None), ExpertTaps):
        return
    _check_layout(experts)
    n, two_i, hidden = experts.gate_up_proj.shape
    taps = ExpertTaps(n, two_i // 2, hidden, experts.forward)
    experts.add_module(TAP, taps)
    experts.forward = _probe_forward.__get__(experts)
    block.register_forward_pre_hook(partial(_record_batch_time, name))  # no closure: a deep copy records its own


def _record_batch_time(name: str, block: torch.nn.Module, args: tuple) -> None:
    taps = getattr(block, name)._modules[TAP]
    if taps.armed:  # only an armed pass lays values out (a few microseconds a layer otherwise)
        shape = args[0].shape
        taps.batch_time = tuple(shape[:2]) if len(shape) == 3 else None


def expert_components(experts: int, path: str = "mlp.experts") -> dict[str, Component]:
    """``expert<i>_<part>`` for every expert and part: the components of the taps :func:`tap_experts` installs."""
    return {f"expert{i}_{part}": Component(f"{path}.{TAP}.{i}.{part}", width=_units)
            for i in range(experts) for part in PARTS}


def _units(tap: LazyTap) -> int:
    return tap.units


class _Pass:
    """One armed pass through the experts: lays each expert's per-token values out as ``(batch, time, units)``
    through its armed taps and takes back the (possibly edited) values of the tokens routed to it."""

    def __init__(self, taps: ExpertTaps, tokens: int) -> None:
        self.taps, self.tokens = taps.table, tokens
        self.on = {part: [e for e, tap in enumerate(row) if tap.armed] for part, row in taps.table.items()}
        bt = taps.batch_time
        self.shape = bt if bt is not None and bt[0] * bt[1] == tokens else (1, tokens)

    def through(self, e: int, part: str, values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``values[j]``: expert ``e``'s ``part`` at token ``tokens[j]`` (each token at most once); unchanged
        unless that tap is armed, else what the tap gives at those tokens (rows of other tokens are dropped)."""
        tap = self.taps[part][e]
        if not tap.armed:
            return values
        dense = values.new_zeros(self.tokens, values.shape[-1]).index_copy_(0, tokens, values)
        return tap(dense.view(*self.shape, -1)).reshape(self.tokens, -1)[tokens]

    def idle(self, e: int, like: torch.Tensor) -> None:
        """Expert ``e`` took no token: its armed taps see zeros (a pass calls every armed tap, in one order)."""
        for part in PARTS:
            tap = self.taps[part][e]
            if tap.armed:
                tap(like.new_zeros(*self.shape, tap.units))

    def rows(self, part: str, values: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``values[s]``: the ``part`` of the (token ``tokens[s]``, expert ``experts[s]``) pair ``s``, every pair of
        the pass; each armed expert's rows go through its tap."""
        if not self.on[part]:
            return values
        values = values.clone()
        for e in self.on[part]:
            sel = (experts == e).nonzero().squeeze(1)
            values[sel] = self.through(e, part, values[sel], tokens[sel])
        return values

    # The gate and up taps edit the concatenated projection, which the activation then splits as it always does:
    # elementwise kernels may round differently on a split view than on a contiguous copy (SiLU does on CPU).
    def gate_up(self, proj: torch.Tensor, experts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The concatenated ``[gate, up]`` projection of every pair, through the gate and up taps."""
        if not (self.on["gate"] or self.on["up"]):
            return proj
        gate, up = proj.chunk(2, dim=-1)
        return torch.cat([self.rows("gate", gate, experts, tokens), self.rows("up", up, experts, tokens)], dim=-1)

    def gate_up_of(self, e: int, proj: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s concatenated ``[gate, up]`` projection at ``tokens``, through its gate and up taps."""
        if not (self.taps["gate"][e].armed or self.taps["up"][e].armed):
            return proj
        gate, up = proj.chunk(2, dim=-1)
        return torch.cat([self.through(e, "gate", gate, tokens), self.through(e, "up", up, tokens)], dim=-1)


def _probe_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward: their own while no tap is armed, else the same implementation with taps in it."""
    taps = getattr(self, TAP)
    if not taps.armed:
        return taps.original(hidden_states, top_k_index, top_k_weights)
    impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"Expert sites run the experts as transformers' {', '.join(IMPLEMENTATIONS)} "
                        f"implementations do; this model's experts run '{impl}' (set its config's "
                        f"_experts_implementation to one of those to read or edit single experts).")
    if getattr(self, "_is_expert_parallel", False):
        raise UserError("Expert sites are not available under expert parallelism (each rank holds some experts).")
    return IMPLEMENTATIONS[impl](self, _Pass(taps, hidden_states.shape[0]), hidden_states, top_k_index,
                                 top_k_weights)


# The implementations below are transformers 5.24's (the class's eager loop, integrations/moe.py's grouped_mm and
# batched_mm), restricted to the layout _check_layout admits, with the taps between their steps.

def _eager(self: Any, p: _Pass, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
           top_k_weights: torch.Tensor) -> torch.Tensor:
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).tolist()
    for e in range(self.num_experts):  # index num_experts: a slot routed to no expert
        if not hit[e]:
            p.idle(e, hidden_states)
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        current_state = hidden_states[token_idx]
        gate, up = p.gate_up_of(e, F.linear(current_state, self.gate_up_proj[e]), token_idx).chunk(2, dim=-1)
        current_hidden_states = p.through(e, "act", self.act_fn(gate) * up, token_idx)
        current_hidden_states = p.through(e, "out", F.linear(current_hidden_states, self.down_proj[e]), token_idx)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _grouped_mm(self: Any, p: _Pass, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    tokens = perm // num_top_k
    selected_hidden_states_g = hidden_states[tokens]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    proj_out = _grouped_linear(selected_hidden_states_g, self.gate_up_proj, offsets, is_transposed=False)
    proj_out = self._apply_gate(p.gate_up(proj_out, expert_ids_g, tokens))
    proj_out = p.rows("act", proj_out, expert_ids_g, tokens)
    proj_out = _grouped_linear(proj_out, self.down_proj, offsets, is_transposed=False)
    proj_out = p.rows("out", proj_out, expert_ids_g, tokens)
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted_out = weighted_out[inv_perm]
    return weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _batched_mm(self: Any, p: _Pass, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    tokens = torch.arange(expert_ids.numel(), device=expert_ids.device) // num_top_k
    proj_out = _batched_linear(selected_hidden_states, self.gate_up_proj[expert_ids], is_transposed=False)
    proj_out = self._apply_gate(p.gate_up(proj_out, expert_ids, tokens))
    proj_out = p.rows("act", proj_out, expert_ids, tokens)
    proj_out = _batched_linear(proj_out, self.down_proj[expert_ids], is_transposed=False)
    proj_out = p.rows("out", proj_out, expert_ids, tokens)
    weighted_out = proj_out * sample_weights.unsqueeze(-1)
    return weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": _eager, "grouped_mm": _grouped_mm, "batched_mm": _batched_mm}
