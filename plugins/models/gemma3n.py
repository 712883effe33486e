"""Gemma 3n (``Gemma3nForConditionalGeneration``): a USM Conformer audio encoder and an embedder into an AltUp LM.

Sources: a hub id (default ``google/gemma-3n-E2B-it``; ``google/gemma-3n-E4B-it`` and the base models
``google/gemma-3n-E2B``/``-E4B``), a local directory, or ``tiny`` (a seeded random instance of the real class with
the real ``Gemma3nProcessor``, built offline with Siglip's PIL image processor). The vision tower (timm) is not
built (:func:`~lalm_probe.plugins.models.tiny_gemma3n.without_vision`): this plugin takes speech and text.
Prompt: ``<bos><start_of_turn>user\\n`` + the clip as ``\\n\\n<start_of_audio>`` + 188 ``<audio_soft_token>`` +
``<end_of_audio>\\n\\n`` + the instruction + ``<end_of_turn>\\n<start_of_turn>model\\n``.

Audio positions. The processor always inserts 188 soft tokens (30 s at 160 ms each), whatever the clip's length
(and cuts a longer clip to 30 s):

- ``audio_encoder`` (``model.audio_tower.conformer``): one position per 40 ms of the clip (the subsampled mel frames,
  ``ceil(frames / 4)``); padded frames are left out. Extra ``features``: the subsampled input, what block 0 reads.
- ``audio_tokens`` (the time axis of extra ``audio_encoder.projector``, ``embed_audio`` on the encoder output,
  every 4th position: 160 ms each, ``ceil(positions / 4)``): the clip's soft tokens as the LM receives them.
- On the LM, span ``audio`` covers all 188 soft tokens (exactly the processor's placeholders); only the first
  ``audio_tokens`` of them carry the clip, the rest all hold one padding embedding (``embed_audio`` of the last audio
  vocabulary id). Span ``audio_valid`` is those first positions: read it, not ``audio``, for the clip's content
  (``mean`` over ``audio`` mostly averages the padding embedding).

Stacks: ``audio_encoder`` (Conformer: ``ffn1_*``, ``attn_*``, ``conv_*``, ``mlp_*``, ``final_norm``; ``ffn1``,
``attn``, ``conv`` and ``mlp`` are each branch's output before its residual add, which Gemma 3n's modules include;
``conv_pw1``/``conv_pw2`` are Linear layers and the GLU is a function, so there is no ``conv_glu``) and ``lm``
(``model.language_model.layers``; canonical, plus ``laurel``, the LAuReL branch's normed output, and
``per_layer_input``, the per-layer embedding's contribution). Keys and values are not sites: the last layers reuse an
earlier layer's (KV sharing) and have no projections of their own.

AltUp. Each decoder layer carries 4 residual streams ``(4, batch, time, hidden)``. Stream 0 (``altup_active_idx``)
is the one the layer computes: attention, LAuReL and MLP read it. Streams 1-3 start as learned projections of the
token embeddings (``altup_projections``, rescaled to the embedding's magnitude); in each layer all four are first
mixed with coefficients the router predicts from stream 0 (``predict``), then the update computed on stream 0 is
spread to all four with learned weights (``correct``), and streams 1-3 also receive the per-layer input's
contribution (``per_layer_input``). They never go through attention or the MLP themselves: they are extra memory
the main stream writes to and reads from. ``lm.N.out`` reads and edits stream 0 (the ``altup`` tap layout). The
model reads out the mean of stream 0 and the projected streams 1-3, so the logit lens on ``out`` (final norm, ``lm_head``, the 30.0 logit softcap) is the main stream's view, and at
the last layer it is close to, not equal to, the model's logits (``lens_caveat``).

Padding: in a batch the feature extractor marks as valid up to 3 frames that a clip alone does not have (they start
in the clip and run into the batch's padding), and transformers' subsampling convolutions let the last frames of a
clip read the padding (log-mel of silence, then the first block's normalised output). :meth:`Gemma3n.encode` marks
those frames padded and :func:`clip_padding` zeroes what lies past each clip before each convolution, as their own
zero padding does at the end of a clip alone, so a clip's activations do not depend on its batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import PluginError
from lalm_probe.core.model import Prepared, Prompt
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import conformer_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.tiny_gemma3n import NAMED, build_tiny, without_vision

MAX_SAMPLES = 480_000  # the feature extractor's default max_length (30 s), to which longer clips are cut

CONFORMER = {
    **{k: v for k, v in conformer_layer(
        ffn1="ffw_layer_start", ffn1_norm="ffw_layer_start.pre_layer_norm", ffn2="ffw_layer_end",
        ffn2_norm="ffw_layer_end.pre_layer_norm", up="ffw_layer_1", down="ffw_layer_2", attn="attention",
        attn_norm="attention.pre_attn_norm", q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", o="post",
        conv="lconv1d", conv_norm="pre_layer_norm", dw="depthwise_conv1d", dw_norm="conv_norm", final_norm="norm",
    ).items() if k != "conv_glu"},
    "ffn1": Component("ffw_layer_start.post_layer_norm"), "attn": Component("attention.post_norm"),
    "conv_pw1": Component("lconv1d.linear_start"), "conv_pw2": Component("lconv1d.linear_end"),
    "conv": Component("lconv1d.linear_end"), "mlp": Component("ffw_layer_end.post_layer_norm"),
}
LM_LAYER = {
    **{k: v for k, v in decoder_layer(mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
                                      mlp_post_norm="post_feedforward_layernorm").items()
       if k not in ("attn_k", "attn_v")},
    "out": Component("", layout="altup", width="attn_norm"),
    "laurel": Component("laurel.post_laurel_norm"), "per_layer_input": Component("post_per_layer_input_norm"),
}


class SoftcappedHead(torch.nn.Module):
    """The unembedding as the model applies it: ``lm_head`` then ``cap * tanh(logits / cap)``. A child of the model
    for the lens to address; it holds ``lm_head`` without registering it, so no parameter is added."""

    def __init__(self, head: torch.nn.Module, cap: float | None) -> None:
        super().__init__()
        self.__dict__["head"] = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits if not self.cap else self.cap * torch.tanh(logits / self.cap)


def clip_padding(tower: torch.nn.Module) -> None:
    """Zero the time steps past each clip before each subsampling convolution (the mask comes with the tower's
    input: ``audio_mel_mask`` is True where padded)."""
    mask: dict[str, torch.Tensor] = {}
    tower.register_forward_pre_hook(lambda _m, args: mask.update(valid=(~args[1]).sum(1)))
    blocks = [tower.subsample_conv_projection.conv_0, tower.subsample_conv_projection.conv_1]

    def zero_past(block: torch.nn.Module, args: tuple) -> tuple:
        x, valid = args[0], mask["valid"]
        for _ in range(blocks.index(block)):
            valid = torch.div(valid + 1, 2, rounding_mode="floor")  # each stride-2 block: ceil(n / 2)
        keep = torch.arange(x.shape[2], device=x.device)[None, :] < valid.to(x.device)[:, None]
        return (x * keep[:, None, :, None].to(x.dtype), *args[1:])

    for block in blocks:
        block.register_forward_pre_hook(zero_past)


class Gemma3n(AudioLM):
    name = "gemma3n"
    description = "Gemma 3n (E2B/E4B, instruct/base): USM Conformer audio encoder + AltUp Gemma LM"
    default_checkpoint = "google/gemma-3n-E2B-it"
    hub_ids = ("google/gemma-3n-E2B-it", "google/gemma-3n-E4B-it", "google/gemma-3n-E2B", "google/gemma-3n-E4B")
    model_class = "Gemma3nForConditionalGeneration"
    tiny = build_tiny
    audio_token = NAMED["audio_token"]
    lens_caveat = ("The LM reads out the mean of its 4 AltUp streams; lm.N.out is stream 0, so the lens is the main "
                   "stream's view.")
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.conformer",), components=CONFORMER,
              extras={"features": "model.audio_tower.subsample_conv_projection.input_proj_linear",
                      "projector": Component("model.embed_audio.probe_soft", width=lambda m: m.width,
                                             positions="audio_tokens")}),
        Stack("lm", layers=("model.language_model.layers",), runs="per_step", components=LM_LAYER,
              final_norm=("model.language_model.norm",), unembed=("probe_unembed",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        with without_vision():
            return super().load_weights(source, device=device, dtype=dtype, device_map=device_map)

    def setup(self) -> None:
        super().setup()
        config = self.model.config
        if config.text_config.altup_active_idx != 0:
            raise PluginError("The altup tap layout reads stream 0, but this Gemma 3n's active stream is "
                              f"{config.text_config.altup_active_idx}.")
        self.model.add_module("probe_unembed", SoftcappedHead(self.model.lm_head,
                                                              config.text_config.final_logit_softcapping))
        tower, embed = self.model.model.audio_tower, self.model.model.embed_audio
        clip_padding(tower)
        # embed_audio also embeds every token id at every pass; only its call on the encoder output (soft tokens)
        # goes through this tap, which the projector site reads.
        soft = torch.nn.Identity()
        soft.width = embed.text_hidden_size
        embed.add_module("probe_soft", soft)
        embed.register_forward_hook(lambda _m, _a, kw, out: soft(out) if kw.get("inputs_embeds") is not None else out,
                                    with_kwargs=True)
        audio = config.audio_config
        self.stride = math.prod(s[0] for s in audio.sscp_conv_stride_size)
        self.reduction = audio.conf_reduction_factor

    def encode(self, texts: list[str], clips: list[np.ndarray]) -> dict[str, Any]:
        inputs = super().encode(texts, clips)
        inputs.pop("token_type_ids", None)  # the model takes them only to mark image tokens
        fe = self.processor.feature_extractor
        for i, clip in enumerate(clips):
            # The frames a clip alone has: it is padded to a multiple of 128 samples (at most 30 s) and framed in
            # windows of frame_length + 1 samples. In a batch the extractor also counts the frames that start in
            # the clip and run into the batch's padding; they are marked padded here, so they are left out as well.
            samples = -(-min(len(clip), MAX_SAMPLES) // 128) * 128
            inputs["input_features_mask"][i, (samples - fe.frame_length - 1) // fe.hop_length + 1:] = False
        return inputs

    def max_seconds(self) -> float:
        return MAX_SAMPLES / self.sample_rate  # the feature extractor cuts longer clips to 30 s

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        frames = math.ceil(int(inputs["input_features_mask"][clip].sum()) / self.stride)
        return {"audio_encoder": Positions(0, frames, row=clip),
                "audio_tokens": Positions(0, math.ceil(frames / self.reduction), row=clip)}

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        prepared = super().prepare(items, audio, prompts)
        for row in prepared.rows:
            if "audio_tokens" in row:
                start = row["lm"].spans["audio"][0]
                row["lm"].spans["audio_valid"] = (start, start + row["audio_tokens"].length)
        return prepared


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Gemma3n]
