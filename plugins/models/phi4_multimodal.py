"""Phi-4-multimodal (``Phi4MultimodalForCausalLM``): a Conformer speech encoder and a two-layer projector into
Phi-4-mini, whose speech mode adds a LoRA to the LM.

Sources: a hub id (``microsoft/Phi-4-multimodal-instruct``; the transformers-format weights, with the speech
adapter in ``speech-lora/``), a local directory laid out the same way, or ``tiny`` (a seeded random instance of the
real class and processor parts, with a rank-4 speech LoRA). The processor is the real ``Phi4MultimodalProcessor``
built from the checkpoint's tokenizer, feature extractor and chat template with an image processor that refuses
images (this plugin takes speech and text; the real one needs torchvision). Prompt:
``<|user|><|audio|>…text…<|end|><|assistant|>``, the ``<|audio|>`` repeated once per audio embedding (80 ms).

Stacks (``probe info --model phi4-multimodal --checkpoint tiny`` lists sites and widths):

- ``audio_encoder`` (``…audio_embed.encoder.encoders``, Conformer blocks; positions = encoder frames, 80 ms each,
  one per ``<|audio|>`` token; a clip longer than 40 s, which the model folds into 500-frame chunks, is refused):
  ``ffn1_*`` (``feed_forward_in``; ``ffn1_up`` is its fused ``[up | gate]`` projection), ``attn_*``, ``conv_*``
  (``conv_pw1`` the GLU's pointwise conv, 2x channels; ``conv_glu``; ``conv_dw`` the causal depthwise conv;
  ``conv_dw_pw`` the depthwise-separable pointwise conv right after it, model-specific; ``conv_pw2``; the
  channel-first ones read through taps), ``mlp_*`` (``feed_forward_out``), ``final_norm``. Extras ``features``
  (the subsampled input, what block 0 reads), ``projector_up`` (``up_proj_for_speech``) and ``projector``
  (``down_proj_for_speech``, after a GELU: the embeddings that replace the ``<|audio|>`` tokens).
- ``lm`` (``model.layers``): canonical sites, except that Phi-4-mini fuses its projections: ``attn_qkv``
  (``[q | k | v]``) and ``mlp_gate_up`` (``[gate | up]``); ``mlp_act`` is ``silu(gate) * up``. Final norm and
  ``lm_head``: the logit lens. The ``audio`` span is the ``<|audio|>`` run, ``text`` the instruction.
- ``speech_lora`` (the same layers, when the checkpoint has a speech adapter): the LoRA's own outputs,
  ``<proj>_a`` (``lora_A``: the rank-r code of the projection's input) and ``<proj>_b`` (``lora_B``: the adapter's
  update before its scaling alpha/r, 2 in the release) for ``<proj>`` in ``attn_qkv``, ``attn_o``,
  ``mlp_gate_up``, ``mlp_down``. The LM's ``attn_qkv``/``attn_o``/``mlp_*`` sites are the adapted projections
  (base + scaled update). Rows pass through this stack only while the adapter is on.

Option ``lora`` (``--model phi4-multimodal:lora=on``): ``auto`` (default, as the release runs: the speech LoRA on
for inputs with audio, off for text alone), ``on`` (every item, so speech and text share one set of LM weights) or
``off`` (the base LM).

Padding: transformers' subsampling convolutions let an encoder frame at the end of a short clip read the padding
its batch adds (their normalised value and the convolutions' biases), which an unpadded clip does not see.
:func:`clip_padding` zeroes what lies past each clip before each strided convolution, as the convolution's own
zero padding does for a clip alone, so a clip's activations do not depend on its batch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import PluginError, UserError
from lalm_probe.core.model import Prepared, Prompt
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import conformer_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.tiny_phi4_multimodal import build_tiny

ENCODER = "model.embed_tokens_extend.audio_embed"
MAX_FRAMES = 500  # encoder frames (40 s) past which the encoder folds a clip into chunks
CONFORMER = {
    **{k: v for k, v in conformer_layer(
        ffn1="feed_forward_in", ffn1_norm="feed_forward_in.layer_norm", ffn2="feed_forward_out",
        ffn2_norm="feed_forward_out.layer_norm", up="gate_up_proj", down="down_proj", attn_norm="layer_norm_att",
        q="q_proj", k="k_proj", v="v_proj", o="o_proj", conv="conv", conv_norm="layer_norm",
        pw1="glu.ext_pw_conv_1d", dw="dw_sep_conv_1d.dw_conv", pw2="ext_pw_conv_1d", final_norm="layer_norm",
    ).items() if k != "conv_dw_norm"},  # no norm after the depthwise conv; its pointwise conv instead:
    "conv_glu": Component("conv.glu", width=lambda m: m.output_dim),  # the GLU module returns time-major
    "conv_dw_pw": Component("conv.dw_sep_conv_1d.pw_conv", layout="channels_first"),
}
FUSED = {"attn_q", "attn_k", "attn_v", "mlp_up"}
LM_LAYER = {**{k: v for k, v in decoder_layer(gate=None, up="gate_up_proj").items() if k not in FUSED},
            "attn_qkv": Component("self_attn.qkv_proj"), "mlp_gate_up": Component("mlp.gate_up_proj")}
ADAPTED = {"attn_qkv": "self_attn.qkv_proj", "attn_o": "self_attn.o_proj", "mlp_gate_up": "mlp.gate_up_proj",
           "mlp_down": "mlp.down_proj"}
SPEECH_LORA = Stack("speech_lora", layers=("model.layers",), runs="per_step", components={
    f"{name}_{ab}": Component(f"{path}.lora_{ab.upper()}.speech") for name, path in ADAPTED.items() for ab in "ab"})


class SpeechProcessor:
    """Loads the real ``Phi4MultimodalProcessor`` from a checkpoint without its image processor (torchvision)."""

    @staticmethod
    def from_pretrained(source: str) -> Any:
        from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor
        from transformers.image_processing_utils import BaseImageProcessor

        class NoImages(BaseImageProcessor):
            def preprocess(self, *args: Any, **kwargs: Any) -> Any:
                raise UserError("The phi4-multimodal plugin takes speech and text, not images.")

        tok = AutoTokenizer.from_pretrained(source)
        if getattr(tok, "audio_token", None) is None:  # tokenizers that predate the named placeholders
            tok.add_special_tokens({"image_token": "<|image|>", "audio_token": "<|audio|>"})
        template = Phi4MultimodalProcessor.get_processor_dict(source)[0].get("chat_template")
        return Phi4MultimodalProcessor(image_processor=NoImages(), audio_processor=
                                       Phi4MultimodalFeatureExtractor.from_pretrained(source), tokenizer=tok,
                                       chat_template=template or tok.chat_template)


def load_speech_lora(model: torch.nn.Module, source: str | Path) -> bool:
    """Inject the checkpoint's ``speech-lora`` adapter (peft) into the LM; False when the checkpoint has none."""
    from transformers.utils import cached_file

    config = cached_file(str(source), "adapter_config.json", subfolder="speech-lora",
                         _raise_exceptions_for_missing_entries=False)
    if config is None:
        return False
    try:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("This Phi-4-multimodal checkpoint has a speech LoRA, which needs peft: "
                        "pip install 'lalm-probe[phi4]'.") from None
    weights = load_file(cached_file(str(source), "adapter_model.safetensors", subfolder="speech-lora"))
    weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    inject_adapter_in_model(LoraConfig.from_pretrained(str(Path(config).parent)), model, adapter_name="speech")
    missing = [k for k in set_peft_model_state_dict(model, weights, adapter_name="speech").missing_keys
               if ".lora_" in k]
    if missing:
        raise PluginError(f"The speech LoRA of '{source}' has no weights for {missing[0]} (and "
                          f"{len(missing) - 1} more); it does not match this model.")
    return True


def clip_padding(encoder: torch.nn.Module, lengths: dict[str, torch.Tensor]) -> None:
    """Make each clip's encoding independent of its batch's padding, as the clip alone computes it.

    Before each strided convolution of the subsampling, the time steps past each clip's valid frames are zeroed
    (a clip alone sees the convolution's zero padding there). In each block's attention the padded keys are masked:
    transformers adds the boolean padding mask to the attention bias, so a padded key only loses 1 from its score.
    """
    convs = [m for m in encoder.embed.conv if isinstance(m, torch.nn.Conv2d) and m.stride[0] > 1]

    def zero_past(_m: Any, args: tuple) -> tuple | None:
        if "frames" not in lengths:
            return None
        x, valid = args[0], lengths["frames"]
        for _ in range(convs.index(_m)):
            valid = torch.div(valid + 1, 2, rounding_mode="floor")  # each stride-2 conv: ceil(n / 2)
        keep = torch.arange(x.shape[2], device=x.device)[None, :] < valid.to(x.device)[:, None]
        return (x * keep[:, None, :, None].to(x.dtype), *args[1:])

    def mask_keys(_m: Any, args: tuple) -> tuple | None:
        if "frames" not in lengths:
            return None
        hidden, bias = args[0], args[1]
        valid = -(-lengths["frames"] // encoder.config.time_reduction)  # encoder frames: ceil(n / 8)
        padded = torch.arange(hidden.shape[1], device=bias.device)[None, :] >= valid.to(bias.device)[:, None]
        return (hidden, bias.masked_fill(padded[:, None, None, :], torch.finfo(bias.dtype).min), *args[2:])

    for conv in convs:
        conv.register_forward_pre_hook(zero_past)
    for block in encoder.encoders:
        block.register_forward_pre_hook(mask_keys)


class Phi4Multimodal(AudioLM):
    name = "phi4-multimodal"
    description = "Phi-4-multimodal: Conformer speech encoder + projector + Phi-4-mini LM with a speech LoRA"
    default_checkpoint = "microsoft/Phi-4-multimodal-instruct"
    hub_ids = ("microsoft/Phi-4-multimodal-instruct",)
    model_class = "Phi4MultimodalForCausalLM"
    processor_class = SpeechProcessor
    tiny = build_tiny
    audio_token = "<|audio|>"
    option_defaults = {"lora": "auto"}
    option_help = {
        "lora": "the speech LoRA: auto (on for audio items), on or off",
    }
    stacks_at_load = ("speech_lora",)  # when the checkpoint has the speech LoRA
    stacks = (
        Stack("audio_encoder", layers=(f"{ENCODER}.encoder.encoders",), components=CONFORMER,
              extras={"features": Component(f"{ENCODER}.encoder.embed", width=lambda m: m.out.out_features),
                      "projector_up": f"{ENCODER}.up_proj_for_speech", "projector": f"{ENCODER}.down_proj_for_speech"}),
        Stack("lm", layers=("model.layers",), runs="per_step", components=LM_LAYER, final_norm=("model.norm",),
              unembed=("lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        model, processor = super().load_weights(source, device=device, dtype=dtype, device_map=device_map)
        load_speech_lora(model, source)  # peft puts each adapter on its base layer's device
        return model.eval(), processor

    def setup(self) -> None:
        super().setup()
        if self.tokenizer.audio_token_id != self.model.config.audio_config.audio_token_id:
            raise PluginError(f"The tokenizer's {self.audio_token} is id {self.tokenizer.audio_token_id}, the "
                              f"model's audio token {self.model.config.audio_config.audio_token_id}.")
        self.adapted = [m for m in self.model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
        if self.adapted:
            self.stacks = (*type(self).stacks, SPEECH_LORA)
        self.model.register_forward_pre_hook(self._speech_mode, with_kwargs=True)
        lengths: dict[str, torch.Tensor] = {}
        encoder = self.model.get_submodule(f"{ENCODER}.encoder")
        encoder.register_forward_pre_hook(lambda _m, args: lengths.update(frames=self._frames(*args)))
        clip_padding(encoder, lengths)

    @staticmethod
    def _frames(features: torch.Tensor, mask: torch.Tensor | None = None, *_: Any) -> torch.Tensor:
        """Valid feature frames per clip (a lone clip comes without a mask)."""
        return mask.sum(1) if mask is not None else torch.full(features.shape[:1], features.shape[1])

    def lora_on(self, speech: bool) -> bool:
        return bool(self.adapted) and {"on": True, "off": False}.get(self.options["lora"], speech)

    def _speech_mode(self, _module: Any, _args: tuple, kwargs: dict) -> None:
        """The release's rule: the speech adapter is on while the input has audio (``lora=auto``)."""
        on = self.lora_on(kwargs.get("audio_input_features") is not None)
        for layer in self.adapted:
            if layer.disable_adapters == on:
                layer.enable_adapters(on)

    def configure(self, **options: Any) -> "Phi4Multimodal":
        super().configure(**options)
        if self.options["lora"] not in ("auto", "on", "off"):
            raise UserError(f"Model '{self.name}' option 'lora' is auto, on or off, not '{self.options['lora']}'.")
        return self

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        prepared = super().prepare(items, audio, prompts)
        sizes = iter(prepared.inputs.get("audio_embed_sizes", []))
        for it, row in zip(items, prepared.rows):
            if it.has_audio and int(next(sizes)) > MAX_FRAMES:
                raise UserError(f"Item '{it.id}' is longer than 40 s, which Phi-4-multimodal's encoder folds into "
                                "chunks that share no attention; cut it into shorter clips.")
            if self.lora_on(it.has_audio):
                row["speech_lora"] = replace(row["lm"])
        return prepared

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        # One encoder frame per 8 feature frames (80 ms), ceil'd: exactly the clip's <|audio|> count.
        return {"audio_encoder": Positions(0, int(inputs["audio_embed_sizes"][clip]), row=clip)}


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Phi4Multimodal]
