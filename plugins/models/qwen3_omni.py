"""Qwen3-Omni's thinker (``Qwen3OmniMoeThinkerForConditionalGeneration``): packed audio tower + Qwen3 MoE LM.

Sources: a hub id (default ``Qwen/Qwen3-Omni-30B-A3B-Instruct``; ``-Thinking``, ``-Captioner``), a local directory,
or ``tiny``. The talker and code2wav (speech output) are not loaded.

- Audio tower: like Qwen2.5-Omni's, every clip of a batch packed into one sequence ``(sum of frames, units)``, read
  through the ``packed`` layout with each clip a span of row 0. Three stride-2 convolutions per 1 s chunk give 13
  positions per second, one per ``<|audio_pad|>`` token; the norm (``ln_post``) and the two-layer projector into the
  LM (``proj1``, GELU, ``proj2`` = ``projector``) run on the same positions.
- The LM's MLPs are mixtures of experts. Per layer: ``mlp_norm``; ``moe_router``, the router logits as
  ``(batch, time, experts)`` (width = number of experts); ``mlp``, the block's output, i.e. the routing-weighted sum
  of the chosen experts' MLPs. The router's module output flattens batch and time ``(batch*time, experts)``; a tap
  restores the two axes from the block's input, and an edit of the logits re-routes (softmax, top-k and
  renormalisation are recomputed from the edited logits exactly as the router does). Which experts a token took is
  the top-k of ``moe_router``.
- Each expert's MLP: ``expert<i>_gate``, ``expert<i>_up``, ``expert<i>_act`` (act(gate)*up, width
  ``moe_intermediate_size``) and ``expert<i>_out`` (its output before the routing weight, width ``hidden_size``)
  for i = 0..num_experts-1 (128 in the released models), read and edited as ``(batch, time, units)`` on the LM's
  positions like any MLP. The experts are one fused module that runs each expert on the tokens routed to it, so a
  token not routed to expert i reads zeros there and an edit at it changes nothing; an edit at a routed token flows
  through the rest of the expert and its routing weight into ``mlp``. The taps cost nothing in a pass that reads
  none of them (see :mod:`lalm_probe.core.experts`).
- mRoPE positions come from the model (``get_rope_index``), as for Qwen2.5-Omni.
- The processor pads waveforms to the batch's longest clip, which changes a clip's last mel frame with the batch;
  each clip's features are taken as the processor computes them for the clip alone, so a clip reads the same in
  any batch (only frames past its end, which the tower drops, stay batch-dependent).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.experts import expert_components, tap_experts
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.taps import TAP, Tap
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component

from .audio_chat import AudioChat
from .qwen2_5_omni import packed_clips
from .tiny_qwen_omni import build_qwen3_omni


def audio_tokens(frames: torch.Tensor, n_window: int = 50) -> torch.Tensor:
    """``<|audio_pad|>`` tokens for ``frames`` valid mel frames: 13 per full chunk of ``2*n_window`` frames plus the
    remainder's three stride-2 convolutions (the processor's and the tower's formula)."""
    tail = (frames % (2 * n_window) - 1) // 2 + 1
    return ((tail - 1) // 2 + 1 - 1) // 2 + 1 + frames // (2 * n_window) * 13


class Omni3Processor(AudioChat):
    """What ``Qwen3OmniMoeProcessor`` does with text and audio (waveforms padded to the longest clip)."""

    @classmethod
    def from_pretrained(cls, source: Any, **kwargs: Any) -> "Omni3Processor":
        return super().from_pretrained(source, tokens=audio_tokens, audio_kwargs=dict(
            sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True))


class RouterTap(Tap):
    """The router logits of one MoE block as ``(batch, time, experts)``; ``units`` is the number of experts."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.units = units


def tap_router(block: torch.nn.Module) -> None:
    """Route the block's router logits through a tap in site layout; the routing follows the tapped logits."""
    router = block.gate
    tap = RouterTap(router.num_experts)
    router.add_module(TAP, tap)
    shape: dict[str, Any] = {}
    block.register_forward_pre_hook(lambda _m, args: shape.update(bt=args[0].shape[:2]))

    def through_tap(_m: Any, _args: Any, out: tuple) -> tuple:
        logits = tap(out[0].view(*shape["bt"], -1)).reshape(out[0].shape)
        top, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), router.top_k, dim=-1)
        if router.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    router.register_forward_hook(through_tap)


# A Qwen3 decoder layer whose MLP is a mixture of experts: attention as usual, then the block (no single up/down).
NON_MLP = {k: v for k, v in decoder_layer().items() if not k.startswith("mlp_") or k == "mlp_norm"}


class Qwen3Omni(AudioLM):
    name = "qwen3-omni"
    description = "Qwen3-Omni thinker (30B-A3B Instruct / Thinking / Captioner): packed audio tower + Qwen3 MoE LM"
    default_checkpoint = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    hub_ids = ("Qwen/Qwen3-Omni-30B-A3B-Instruct", "Qwen/Qwen3-Omni-30B-A3B-Thinking",
               "Qwen/Qwen3-Omni-30B-A3B-Captioner")
    model_class = "Qwen3OmniMoeThinkerForConditionalGeneration"
    processor_class = Omni3Processor
    tiny = build_qwen3_omni
    audio_token = "<|audio_pad|>"
    pass_position_ids = False  # the model's own mRoPE positions (get_rope_index)
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.layers",), components=bart_layer(layout="packed"),
              extras={"norm": Component("model.audio_tower.ln_post", layout="packed"),
                      "projector": Component("model.audio_tower.proj2", layout="packed")}),
        Stack("lm", layers=("model.language_model.layers",), runs="per_step",
              components={**NON_MLP, "mlp": Component("mlp", width="attn_norm"),
                          "moe_router": Component(f"mlp.gate.{TAP}", width=lambda tap: tap.units)},
              final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),
    )

    def setup(self) -> None:
        super().setup()
        for layer in self.model.model.language_model.layers:
            if hasattr(layer.mlp, "gate") and not hasattr(layer.mlp.gate, TAP):
                tap_router(layer.mlp)
                tap_experts(layer.mlp)
        experts = expert_components(self.model.config.text_config.num_experts)  # as many as this checkpoint has
        self.stacks = tuple(replace(st, components={**st.components, **experts}) if st.name == "lm" else st
                            for st in type(self).stacks)

    def encode(self, texts: list[str], clips: list[np.ndarray]) -> dict[str, Any]:
        inputs = super().encode(texts, clips)
        for b, clip in enumerate(clips):  # each clip's features as the processor computes them for it alone
            alone = self.processor.features([clip])
            n = int(alone["feature_attention_mask"].sum())
            inputs["input_features"][b, :, :n] = alone["input_features"][0, :, :n]
        return inputs

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        n_window = self.model.config.audio_config.n_window
        lengths = audio_tokens(inputs["feature_attention_mask"].sum(-1), n_window).tolist()
        return packed_clips(lengths, clip, "audio_encoder")


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Qwen3Omni]
