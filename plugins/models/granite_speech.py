"""Granite Speech (``GraniteSpeechForConditionalGeneration``): Conformer CTC encoder, BLIP-2 Q-Former projector and a
Granite LM with a LoRA that is on whenever audio is present.

Sources: a hub id (default ``ibm-granite/granite-speech-3.3-2b``), a local directory, or ``tiny`` (a seeded random
instance of the real class with an offline processor and a LoRA). torchaudio, which the feature extractor uses, has
no wheel for every torch; without it a pure-torch mel spectrogram stands in (:mod:`.melspec`).

Stacks, and the time axis each is read on:

- ``audio_encoder``: Conformer layers, one position per encoder frame (two 10 ms mel frames stacked, 50 per second);
  ``audio_encoder.ctc`` is the CTC head the middle layer feeds back (``model.encoder.out``).
- ``projector``: the Q-Former's layers. It reads the encoder in windows of 15 frames with 3 learned queries each;
  windows are its batch axis, so its sites are read packed (one row, every window's queries in order) and a clip's
  positions are its windows' queries, ``3 * ceil(frames / 15)``, one per LM audio token. Cross-attention keys and
  values are on the windows' frames. ``projector.output`` (``model.projector.linear``) is the LM's input for the
  audio, one row per ``<|audio|>`` token.
- ``lm``: the Granite LM; ``audio`` is the ``<|audio|>`` run, ``text`` the user's words.
- ``lora`` (when the checkpoint has an adapter): per adapted projection ``p``, ``p_a`` (A's output, rank wide) and
  ``p_b`` (B's output; the projection adds ``scaling`` times it). ``lm.*.attn_q`` etc. are the adapted projections.
  As in Granite's ``generate``, the adapter is on for a batch with audio and off for text; only speech items pass
  through this stack.

Padding. The encoder has no padding mask: in a padded batch a short clip's last attention block, depthwise
convolution and Q-Former window see the batch's padding, which alone they do not. Features are therefore computed
per clip (as the clip alone gets them) and zero-padded, and hooks mask attention keys and zero the convolution and
Q-Former inputs past each clip's frames, so a clip in a batch reads as it does alone (``probe check`` padding).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import Prepared, Prompt
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack, get_module
from lalm_probe.core.templates import conformer_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.lora import apply_adapter, lora_layers, read_adapter
from lalm_probe.plugins.models.melspec import install
from lalm_probe.plugins.models.tiny_granite_speech import FE_MODULE, build_tiny

LM_LAYERS = "model.language_model.layers"


def _encoder_layer() -> dict[str, Component]:
    comps = conformer_layer(ffn1="ff1", ffn1_norm="ff1.pre_norm", ffn2="ff2", ffn2_norm="ff2.pre_norm", up="up_proj",
                            down="down_proj", attn="attn", attn_norm="attn.pre_norm", q="to_q", k="to_kv", v="to_kv",
                            o="to_out", conv="conv", conv_norm="norm", pw1="up_conv", dw="depth_conv.conv",
                            pw2="down_conv", final_norm="post_norm")
    del comps["attn_k"], comps["attn_v"]  # one fused projection: keys then values
    comps["attn_kv"] = Component("attn.to_kv")
    comps["conv_dw_norm"] = Component("conv.batch_norm", layout="channels_first")
    return comps


def _qformer_layer() -> dict[str, Component]:
    """A BLIP-2 Q-Former layer (post-norm BERT with cross-attention), read packed: windows joined in time."""
    def packed(path: str, **kw: Any) -> Component:
        return Component(path, layout="packed", **kw)

    return {"out": packed("", width="mlp_post_norm"), "attn_q": packed("attention.attention.query"),
            "attn_k": packed("attention.attention.key"), "attn_v": packed("attention.attention.value"),
            "attn_o": packed("attention.output.dense"), "attn_post_norm": packed("attention.output.LayerNorm"),
            "cross_q": packed("crossattention.attention.query"),
            "cross_k": packed("crossattention.attention.key", positions="projector_source"),
            "cross_v": packed("crossattention.attention.value", positions="projector_source"),
            "cross_o": packed("crossattention.output.dense"),
            "cross_post_norm": packed("crossattention.output.LayerNorm"),
            "mlp_up": packed("intermediate_query.dense"),
            "mlp_act": packed("intermediate_query", width=lambda m: m.dense.out_features),
            "mlp_down": packed("output_query.dense"), "mlp_post_norm": packed("output_query.LayerNorm")}


class GraniteSpeech(AudioLM):
    name = "granite-speech"
    description = "Granite Speech (3.3 2B / 8B, 3.2 8B): Conformer encoder + Q-Former projector + Granite LM + LoRA"
    default_checkpoint = "ibm-granite/granite-speech-3.3-2b"
    hub_ids = ("ibm-granite/granite-speech-3.3-2b", "ibm-granite/granite-speech-3.3-8b",
               "ibm-granite/granite-speech-3.2-8b")
    model_class = "GraniteSpeechForConditionalGeneration"
    processor_class = "GraniteSpeechProcessor"
    tiny = build_tiny
    audio_token = "<|audio|>"
    stacks_at_load = ("lora",)  # when the checkpoint has LM adapters
    stacks = (
        Stack("audio_encoder", layers=("model.encoder.layers",), components=_encoder_layer(),
              extras={"ctc": "model.encoder.out"}),
        Stack("projector", layers=("model.projector.qformer.encoder.layer",), components=_qformer_layer(),
              extras={"output": Component("model.projector.linear", positions="audio_tokens")}),
        Stack("lm", layers=(LM_LAYERS,), runs="per_step", components=decoder_layer(),
              final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        """The model and processor; then the checkpoint's LoRA, unless peft already applied it."""
        install(FE_MODULE)
        # transformers warns that peft is missing; the adapter is applied below without it.
        logging.getLogger("transformers.models.granite_speech.modeling_granite_speech").setLevel(logging.ERROR)
        # transformers 5 loads a checkpoint's PEFT adapter itself when peft is installed, but only with peft >= 0.22
        # (not on PyPI); with an older peft (another plugin's extra) that load breaks, so it is kept off here.
        with mock.patch("transformers.integrations.peft.is_peft_available", lambda: False):
            model, processor = super().load_weights(source, device=device, dtype=dtype, device_map=device_map)
        if getattr(model.config, "has_lora_adapter", False) and not lora_layers(model):
            adapter = read_adapter(source)
            if adapter is None:
                warnings.warn(f"Granite Speech checkpoint '{source}' says it has a LoRA adapter but ships none; "
                              "its audio answers will not be the released model's.", stacklevel=2)
            else:
                apply_adapter(get_module(model, LM_LAYERS), *adapter, where=f"granite-speech '{source}'")
        return model, processor

    def setup(self) -> None:
        super().setup()
        _mask_encoder_padding(self.model)
        loras = set(lora_layers(self.model))
        adapted = [n for n, m in get_module(self.model, LM_LAYERS)[0].named_modules() if m in loras]
        if adapted:
            comps = {}
            for path in adapted:
                short = path.rpartition(".")[2].removesuffix("_proj")
                comps.update({f"{short}_a": f"{path}.lora_A.default", f"{short}_b": f"{path}.lora_B.default"})
            self.stacks = (*type(self).stacks, Stack("lora", layers=(LM_LAYERS,), runs="per_step", components=comps))
            self.model.register_forward_pre_hook(_switch_lora(lora_layers(self.model)), with_kwargs=True)

    # ---- prompt and inputs -----------------------------------------------------------------------------
    def conversation(self, item: Stimulus, prompt: Prompt) -> list[dict[str, Any]]:
        """Granite's turns are plain strings; the audio is the ``<|audio|>`` placeholder before the words."""
        text = self.user_text(item, prompt) or ""
        conv = [{"role": "user", "content": (self.audio_token if item.has_audio else "") + text}]
        if prompt.assistant_prefix:
            conv.append({"role": "assistant", "content": prompt.assistant_prefix})
        return conv

    def encode(self, texts: list[str], clips: list[np.ndarray]) -> dict[str, Any]:
        """The processor's tokens and masks; features per clip, each as the clip alone gets it, zero-padded."""
        inputs = dict(self.processor(text=texts, audio=clips or None, return_tensors="pt", padding=True))
        inputs.pop("audio_embed_sizes", None)
        if clips:
            fe = self.processor.audio_processor
            feats = [fe(torch.from_numpy(np.asarray(c, dtype=np.float32)))["input_features"][0] for c in clips]
            inputs["input_features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        self._frames = [len(f) for f in feats] if clips else []  # audio_positions reads them for this batch
        return inputs

    def audio_positions(self, inputs: dict[str, Any], clip: int) -> dict[str, Positions]:
        cfg = self.model.config
        window, queries = cfg.window_size, cfg.window_size // cfg.downsample_rate
        frames, windows = self._frames[clip], math.ceil(inputs["input_features"].shape[1] / window)
        tokens = int(inputs["input_features_mask"][clip].sum())
        return {"audio_encoder": Positions(0, frames, row=clip),
                "projector": Positions(clip * windows * queries, tokens, row=0),
                "projector_source": Positions(clip * windows * window, frames, row=0),
                "audio_tokens": Positions(0, tokens, row=clip)}

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        prepared = super().prepare(items, audio, prompts)
        if "lora" in self.resolved:  # the adapter runs for batches with audio (the batch key keeps them apart)
            for row in prepared.rows:
                if "audio" in row["lm"].spans:
                    row["lora"] = Positions(row["lm"].offset, row["lm"].length, dict(row["lm"].spans))
        return prepared


def _switch_lora(layers: list[torch.nn.Module]) -> Any:
    """A forward pre-hook doing what Granite's ``generate`` does: the adapter is on iff the pass has audio. Later
    decode steps (a filled cache, no features) keep the prompt pass's setting."""
    def switch(_mod: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("input_features") is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and cache.get_seq_length() > 0:
                return
        for layer in layers:
            layer.enable_adapters(kwargs.get("input_features") is not None)
    return switch


def _mask_encoder_padding(model: torch.nn.Module) -> None:
    """Make a zero-padded clip in a batch compute what it computes alone (see the module docstring).

    A clip's frames are those before its trailing all-zero feature frames (real log-mel frames are never all
    exactly zero: silence sits at the clip's floor, (max - 8) / 4 + 1). Alone, Granite masks the keys past the clip
    in its last attention block and pads the depthwise convolution and the Q-Former windows with zeros; in a batch
    the same is done per clip. A batch without padding runs the model's own code.
    """
    encoder, projector = model.model.encoder, model.model.projector
    if getattr(encoder, "_probe_masked", False):
        return
    encoder._probe_masked = True
    state: dict[str, torch.Tensor | None] = {"frames": None}

    def find_frames(_mod: Any, args: tuple) -> None:
        feats = args[0]
        valid = feats.ne(0).any(-1)
        frames = torch.where(valid.any(-1), valid.shape[1] - valid.flip(-1).int().argmax(-1), 0)
        state["frames"] = frames if bool((frames < feats.shape[1]).any()) else None

    def zero_past(time_dim: int) -> Any:
        def hook(_mod: Any, args: tuple) -> tuple | None:
            frames = state["frames"]
            if frames is None:
                return None
            x = args[0]
            keep = torch.arange(x.shape[time_dim], device=x.device)[None] < frames.to(x.device)[:, None]
            return (x * keep.unsqueeze(-1 if time_dim == 1 else 1).to(x.dtype), *args[1:])
        return hook

    def expand_queries(_mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # One query row per window (the model broadcasts one), so layer 0's self-attention has a row per window too.
        windows = kwargs["encoder_hidden_states"].shape[0]
        return args, {**kwargs, "query_embeds": kwargs["query_embeds"].expand(windows, -1, -1)}

    encoder.register_forward_pre_hook(find_frames)
    for layer in encoder.layers:
        layer.attn.__class__ = _masked_attention(type(layer.attn))
        layer.attn._probe_state = state
        layer.conv.depth_conv.register_forward_pre_hook(zero_past(2))
    projector.register_forward_pre_hook(zero_past(1))
    projector.qformer.register_forward_pre_hook(expand_queries, with_kwargs=True)


_MASKED: dict[type, type] = {}


def _masked_attention(base: type) -> type:
    """``GraniteSpeechConformerAttention`` whose keys past each row's frames are masked, as its own remainder mask
    does for a clip alone; without padding it is the model's own forward."""
    def forward(self: Any, hidden_states: torch.Tensor, attention_dists: torch.Tensor) -> torch.Tensor:
        frames = self._probe_state["frames"]
        if frames is None:
            return base.forward(self, hidden_states, attention_dists)
        hidden_states = self.pre_norm(hidden_states)
        bsz, num_features, _ = hidden_states.shape
        c = self.context_size
        num_blocks = math.ceil(num_features / c)
        hidden_states = F.pad(hidden_states, (0, 0, 0, num_blocks * c - num_features))
        q = self.to_q(hidden_states)
        k, v = self.to_kv(hidden_states).chunk(2, dim=-1)
        q, k, v = (t.reshape(bsz * num_blocks, c, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        pos_attn = torch.einsum("b h c d, c r d -> b h c r", q, self.rel_pos_emb(attention_dists)) * self.scale
        keys = torch.arange(num_blocks * c, device=q.device)[None] < frames.to(q.device)[:, None]
        pos_attn = pos_attn.masked_fill(~keys.reshape(bsz * num_blocks, 1, 1, c), -torch.finfo(pos_attn.dtype).max)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=pos_attn, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz, num_blocks * c, -1)
        return self.dropout(self.to_out(out[:, :num_features, :]))

    return _MASKED.setdefault(base, type(f"Masked{base.__name__}", (base,), {"forward": forward}))


@hookimpl
def lalm_probe_models() -> list[type]:
    return [GraniteSpeech]
