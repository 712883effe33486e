"""Helpers for the tests of ``plugins/models/arch``: clips, and key lists written from the released code's names."""

from __future__ import annotations

import numpy as np
import torch
from helpers import tone


def clips() -> list[np.ndarray]:
    """A 1 s tone and a 0.4 s tone: two clips of different lengths."""
    return [tone(440, 1.0), tone(220, 0.4)]


def whisper_encoder_keys(prefix: str, layers: int) -> set[str]:
    """``WhisperEncoder`` parameter names (``transformers`` ``modeling_whisper.py``; k_proj has no bias)."""
    keys = {f"{prefix}{n}" for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                      "embed_positions.weight", "layer_norm.weight", "layer_norm.bias")}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        keys |= {p + n for n in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                 "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight",
                                 "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                                 "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight",
                                 "final_layer_norm.bias")}
    return keys


def llama_keys(prefix: str, layers: int, *, lm_head: bool = True, lora: tuple[str, ...] = ()) -> set[str]:
    """``LlamaForCausalLM`` parameter names as its hub checkpoints hold them, with peft-0.3 LoRA keys on ``lora``."""
    keys = {f"{prefix}model.embed_tokens.weight", f"{prefix}model.norm.weight"} | (
        {f"{prefix}lm_head.weight"} if lm_head else set())
    for i in range(layers):
        p = f"{prefix}model.layers.{i}."
        keys |= {p + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")}
        keys |= {f"{p}self_attn.{t}.lora_{ab}.default.weight" for t in lora for ab in "AB"}
    return keys


def checkpoint_keys(model: torch.nn.Module) -> set[str]:
    """A model's state-dict keys as checkpoints store them: tied copies (``lm_head`` / ``proj_out`` = embeddings)
    of every transformers sub-model left out."""
    tied = set()
    for name, module in model.named_modules():
        for key in getattr(module, "all_tied_weights_keys", {}) or {}:
            tied.add(f"{name}.{key}" if name else key)
    return set(model.state_dict()) - tied
