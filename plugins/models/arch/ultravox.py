"""Ultravox 0.5 (``fixie-ai/ultravox-v0_5-llama-3_2-1b`` / ``-llama-3_1-8b``) on transformers building blocks.

Follows ``fixie-ai/ultravox`` ``ultravox/model/ultravox_model.py`` (tag v0.5 and the Feb 2025 revision the hub
repositories ship): a Whisper encoder that accepts less than 30 s (``ModifiedWhisperEncoder``), frame stacking and a
SwiGLU projector (``UltravoxProjector``), and a causal LM. Parameter names are the release's: ``audio_tower.*``,
``multi_modal_projector.{ln_pre,linear_1,ln_mid,linear_2}``, ``language_model.model.*``, ``language_model.lm_head``.
Audio embeddings overwrite ``audio_token_len`` placeholder positions starting at ``audio_token_start_idx``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lalm_probe.core.errors import UserError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.whisper.modeling_whisper import WhisperConfig, WhisperEncoder

from .layout import positions_from_mask, scatter_audio

AUDIO_INPUTS = ("audio_values", "audio_lens", "audio_token_start_idx", "audio_token_len", "audio_batch_size")


class UltravoxConfig(PretrainedConfig):
    """The release's ``UltravoxConfig`` fields that shape the model (``ultravox_config.py``)."""

    model_type = "ultravox"
    sub_configs = {"audio_config": AutoConfig, "text_config": AutoConfig}

    def __init__(self, audio_config: Any = None, text_config: Any = None, audio_model_id: str | None = None,
                 text_model_id: str | None = None, stack_factor: int = 8, hidden_size: int = 4096,
                 projector_act: str = "swiglu", norm_init: float = 0.4, projector_ln_mid: bool = False,
                 audio_latency_block_size: int | None = None, initializer_range: float = 0.02, **kwargs: Any):
        if isinstance(audio_config, dict):
            audio_config = WhisperConfig(**{k: v for k, v in audio_config.items() if k != "model_type"})
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        # copies: PretrainedConfig.__init__ resets its sub-configs' attention implementation, and these objects may
        # be the loaded base models' own configs
        self.audio_config, self.text_config = copy.deepcopy(audio_config), copy.deepcopy(text_config)
        self.audio_model_id, self.text_model_id = audio_model_id, text_model_id
        self.stack_factor, self.hidden_size, self.projector_act = stack_factor, hidden_size, projector_act
        self.norm_init, self.projector_ln_mid = norm_init, projector_ln_mid
        self.audio_latency_block_size, self.initializer_range = audio_latency_block_size, initializer_range
        if projector_act != "swiglu":
            raise UserError(f"Ultravox: projector_act '{projector_act}' is not supported (v0.5 uses swiglu).")
        if audio_latency_block_size:
            raise UserError("Ultravox: streaming checkpoints (audio_latency_block_size) are not supported.")
        super().__init__(**kwargs)


class UltravoxWhisperEncoder(WhisperEncoder):
    """``ModifiedWhisperEncoder``: takes up to ``2 * max_source_positions`` mel frames, slices the positional
    embedding to the input, and masks keys beyond each clip's ``audio_len`` (mel frames)."""

    def forward(self, input_features: torch.Tensor, audio_len: torch.Tensor | None = None,
                **kwargs: Any) -> BaseModelOutput:
        limit = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] > limit:
            raise ValueError(f"Ultravox's Whisper encoder takes at most {limit} mel frames, got "
                             f"{input_features.shape[-1]}; the processor splits longer audio into chunks.")
        x = nn.functional.gelu(self.conv1(input_features))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        hidden = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        mask = None
        if audio_len is not None:
            valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < \
                self._get_feat_extract_output_lengths(audio_len.to(hidden.device)).view(-1, 1)
            mask = (~valid)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class StackAudioFrames(nn.Module):
    """Concatenate every ``stack_factor`` consecutive frames (zero-padding the tail): T frames -> ceil(T/s) tokens."""

    def __init__(self, stack_factor: int = 8) -> None:
        super().__init__()
        self.stack_factor = stack_factor

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        b, t, c = audio_embeds.shape
        s = self.stack_factor
        padded = nn.functional.pad(audio_embeds, (0, 0, 0, (t + s - 1) // s * s - t))
        return padded.view(b, -1, c * s)


class SwiGLU(nn.Module):
    """``x, gate = chunk(2); silu(gate) * x`` (the release's ``SwiGLU``: the *second* half gates)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * x


class UltravoxProjector(nn.Module):
    """``ln_pre`` -> ``linear_1`` -> SwiGLU -> ``ln_mid`` (v0.5) -> ``linear_2`` (-> ``ln_post`` up to v0.4.1)."""

    def __init__(self, config: UltravoxConfig) -> None:
        super().__init__()
        dim_in = config.audio_config.d_model * config.stack_factor
        dim_mid = config.hidden_size // 2
        dim_out = config.text_config.hidden_size
        self._pad_and_stack = StackAudioFrames(config.stack_factor)
        self.ln_pre = LlamaRMSNorm(dim_in, eps=1e-6)
        self.linear_1 = nn.Linear(dim_in, config.hidden_size, bias=False)
        self.act = SwiGLU()
        self.ln_mid = LlamaRMSNorm(dim_mid, eps=1e-6) if config.projector_ln_mid else nn.Identity()
        self.linear_2 = nn.Linear(dim_mid, dim_out, bias=False)
        self.ln_post = nn.Identity() if config.projector_ln_mid else LlamaRMSNorm(dim_out, eps=1e-6)
        self._norm_init = config.norm_init

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(self._pad_and_stack(audio_features))
        return self.ln_post(self.linear_2(self.ln_mid(self.act(self.linear_1(x)))))


class UltravoxModel(PreTrainedModel, GenerationMixin):
    """Whisper encoder + stacking projector + causal LM, with the release's module names and forward."""

    config_class = UltravoxConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: UltravoxConfig, language_model: nn.Module | None = None) -> None:
        super().__init__(config)
        self.audio_tower = UltravoxWhisperEncoder(config.audio_config)
        self.multi_modal_projector = UltravoxProjector(config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LlamaRMSNorm) and any(module is m for m in self.multi_modal_projector.modules()):
            nn.init.constant_(module.weight, self.multi_modal_projector._norm_init)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def encode_audio(self, audio_values: torch.Tensor, audio_lens: torch.Tensor) -> torch.Tensor:
        """Projector output per clip. Encoder frames past a clip's length are zeroed before stacking, so a clip
        padded inside a batch stacks exactly as when it is alone (where the stacker pads with zeros)."""
        enc = self.audio_tower(audio_values.to(self.audio_tower.dtype), audio_len=audio_lens).last_hidden_state
        frames = self.audio_tower._get_feat_extract_output_lengths(audio_lens.to(enc.device))
        keep = torch.arange(enc.shape[1], device=enc.device)[None, :] < frames[:, None]
        return self.multi_modal_projector(enc * keep[..., None].to(enc.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, audio_values: torch.Tensor | None = None,
                audio_lens: torch.Tensor | None = None, audio_token_start_idx: torch.Tensor | None = None,
                audio_token_len: torch.Tensor | None = None, audio_batch_size: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                use_cache: bool | None = None, **kwargs: Any):
        """The release's forward: embed, overwrite the placeholder span with projected audio, run the LM."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if audio_values is not None and len(audio_values) > 0:
            audio_embeds = self.encode_audio(audio_values, audio_lens).to(inputs_embeds.dtype)
            inputs_embeds = scatter_audio(inputs_embeds, audio_embeds, audio_token_start_idx, audio_token_len,
                                          audio_batch_size)
        if position_ids is None and attention_mask is not None and (cache is None or cache.get_seq_length() == 0):
            position_ids = positions_from_mask(attention_mask)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any):
        """Audio goes in with the prompt pass only; later steps reuse the cache (as the release's override does)."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in AUDIO_INPUTS:
                inputs.pop(key, None)
        return inputs
