"""The canonical site vocabulary: one name for each part of a layer, on every model.

A site is ``stack.layer.component``; the component names below mean the same thing on Qwen2-Audio's LM, Whisper's
decoder and SeamlessM4T v2's Conformer, so an analysis or intervention written once (``lm.*.mlp_act``) runs on every
model that has the part. A plugin maps the components its layers have (through the templates in
:mod:`~lalm_probe.core.templates`) and may add model-specific extras under other names.

Every value is read as ``(batch, time, units)``; *width* is the number of units. Attention and norm "outputs" are the
module outputs, before any residual add.

Component families (:data:`PATTERNS`) name one component per index where a layer has many of a part: a
mixture-of-experts MLP's expert i is ``expert<i>_gate``, ``expert<i>_up``, ``expert<i>_act`` and ``expert<i>_out``
(``lm.*.expert5_act``), its MLP read like any MLP (``mlp_gate``, ``mlp_up``, ``mlp_act``, ``mlp_down``) on the
layer's own positions. An expert runs only on the tokens routed to it: at other tokens it reads zeros and an edit
changes nothing (:mod:`~lalm_probe.core.experts`). A layer with 128 experts has 512 such components; the pattern
keeps them one entry here and one row in ``probe info``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Component:
    """Where one component lives, relative to a layer (or to the model for a stack-level extra).

    ``path``: a dotted module path, or candidates tried in order (paths move between transformers versions);
    ``""`` is the layer itself. ``io``: read the module's ``output`` or its first positional ``input`` (the MLP's
    hidden activation is the input of its output projection). ``width``: the number of units, inferred from the
    module when it is a Linear, Conv1d, norm or Embedding; otherwise another component's name, an int, or a function
    of the module. ``layout``: ``channels_first`` outputs ``(batch, channels, time)`` are read
    and edited time-major through a tap, ``vector`` outputs ``(batch, units)`` as one position (see
    :mod:`~lalm_probe.core.taps`).
    """

    path: str | tuple[str, ...] = ""
    io: str = "output"
    width: int | str | Callable[[torch.nn.Module], int] | None = None
    layout: str = "time_major"
    positions: str | None = None

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)


# name -> what it is. Grouped as the README table shows it.
VOCABULARY: dict[str, str] = {
    "out": "block output: the residual stream after the layer",
    # self-attention
    "attn_norm": "norm before self-attention (ln1)",
    "attn_q": "query projection output",
    "attn_k": "key projection output",
    "attn_v": "value projection output",
    "attn_o": "attention output projection output",
    "attn": "self-attention module output (before the residual add)",
    "attn_post_norm": "norm after self-attention (post-norm layers, Gemma)",
    # cross-attention (encoder-decoders)
    "cross_norm": "norm before cross-attention",
    "cross_q": "cross-attention query projection output",
    "cross_k": "cross-attention key projection output (source time axis)",
    "cross_v": "cross-attention value projection output (source time axis)",
    "cross_o": "cross-attention output projection output",
    "cross": "cross-attention module output",
    # feed-forward
    "mlp_norm": "norm before the MLP (ln2)",
    "mlp_gate": "MLP gate projection output (gated MLPs)",
    "mlp_up": "MLP input projection output, before the activation (fc1, up_proj)",
    "mlp_act": "MLP hidden activation: the input of its output projection (act(gate)*up, act(fc1))",
    "mlp_down": "MLP output projection output (fc2, down_proj)",
    "mlp": "MLP module output (before the residual add)",
    "mlp_post_norm": "norm after the MLP (post-norm layers, Gemma)",
    # mixture-of-experts MLPs (the block's output is ``mlp``)
    "moe_router": "MoE router logits, one unit per expert (which experts a token takes: their top-k)",
    # Conformer layers (the second feed-forward module is mlp_*)
    "ffn1_norm": "Conformer: norm before the first (half-step) feed-forward module",
    "ffn1_up": "Conformer: first feed-forward input projection output",
    "ffn1_act": "Conformer: first feed-forward hidden activation",
    "ffn1_down": "Conformer: first feed-forward output projection output",
    "ffn1": "Conformer: first feed-forward module output",
    "conv_norm": "Conformer: norm before the convolution module",
    "conv_pw1": "Conformer: first pointwise convolution output (2x channels)",
    "conv_glu": "Conformer: GLU output",
    "conv_dw": "Conformer: depthwise convolution output",
    "conv_dw_norm": "Conformer: norm after the depthwise convolution",
    "conv_pw2": "Conformer: second pointwise convolution output",
    "conv": "Conformer: convolution module output",
    "final_norm": "the layer's own closing norm (Conformer final_layer_norm)",
}


# pattern (``<i>`` an index from 0) -> what each member is
PATTERNS: dict[str, str] = {
    "expert<i>_gate": "MoE expert i's gate projection output (zero at tokens not routed to expert i)",
    "expert<i>_up": "MoE expert i's up projection output (zero at tokens not routed to expert i)",
    "expert<i>_act": "MoE expert i's hidden activation act(gate)*up, the input of its down projection (zero at "
                     "tokens not routed to expert i, where an edit changes nothing)",
    "expert<i>_out": "MoE expert i's output (its down projection), before the routing weight (zero at tokens not "
                     "routed to expert i)",
}
_MEMBER = re.compile("^" + "|".join(f"(?:{re.escape(p).replace('<i>', '(?:0|[1-9][0-9]*)')})" for p in PATTERNS) + "$")


def pattern_of(name: str) -> str | None:
    """The pattern a component belongs to (``expert12_act`` -> ``expert<i>_act``), or None."""
    return re.sub(r"\d+", "<i>", name, count=1) if _MEMBER.match(name) else None


def describe(name: str) -> str | None:
    """What a canonical component is (a pattern member's pattern text), or None for a model-specific one."""
    pattern = pattern_of(name)
    return PATTERNS[pattern] if pattern else VOCABULARY.get(name)


def is_canonical(name: str) -> bool:
    """Whether ``name`` is a canonical component or a member of a pattern (anything else is model-specific)."""
    return name in VOCABULARY or pattern_of(name) is not None
