"""DeSTA2 (``DeSTA-ntu/DeSTA2-8B-beta``) on transformers building blocks.

Follows ``kehanlu/DeSTA2`` ``desta/modeling_desta.py``: ``speech_perception.whisper`` is a full
``WhisperForConditionalGeneration`` (it transcribes the audio, and its encoder's hidden states feed the connector);
``speech_perception.connector`` (``QformerConnector``) runs 64 learned prompts per selected encoder layer through a
2-layer BERT encoder with cross-attention, mixes the layers with softmaxed weights and projects to the LM width;
``llama`` is Llama 3 8B Instruct. The 64 audio embeddings are inserted at the audio position, followed by the
transcription text. Parameter names are the release's; the connector's are those of ``qformer_connector.pth``.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from lalm_probe.core.errors import UserError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)
from transformers.models.bert.modeling_bert import BertEncoder

from .layout import positions_from_mask, scatter_audio

AUDIO_INPUTS = ("input_features", "audio_token_start_idx", "audio_token_len", "audio_batch_size")
# ``QformerConnector.__init__``: which ``encoder_hidden_states`` (0 = embeddings, i = after layer i) it reads.
TARGET_LAYERS = {"openai/whisper-medium": (5, 11, 17, 23), "openai/whisper-small": (2, 5, 8, 11),
                 "openai/whisper-tiny": (0, 1, 2, 3), "openai/whisper-large-v3": tuple(range(3, 32, 4))}


class Desta2Config(PretrainedConfig):
    """``Desta2Config``: the base model ids, their configs and the prompt size (64)."""

    model_type = "DestaModel"
    sub_configs = {"whisper_config": AutoConfig, "llama_config": AutoConfig}

    def __init__(self, llama_model_id: str = "meta-llama/Meta-Llama-3-8B-Instruct",
                 whisper_model_id: str = "openai/whisper-small", prompt_size: int = 64,
                 whisper_config: Any = None, llama_config: Any = None,
                 target_layer_ids: Sequence[int] | None = None, qformer_intermediate_size: int = 3072,
                 initializer_range: float = 0.02, **kwargs: Any):
        if isinstance(whisper_config, dict):
            whisper_config = WhisperConfig(**{k: v for k, v in whisper_config.items() if k != "model_type"})
        if isinstance(llama_config, dict):
            llama_config = AutoConfig.for_model(**llama_config)
        # copies: PretrainedConfig.__init__ resets its sub-configs' attention implementation, and these objects may
        # be the loaded base models' own configs
        whisper_config, llama_config = copy.deepcopy(whisper_config), copy.deepcopy(llama_config)
        self.llama_model_id, self.whisper_model_id, self.prompt_size = llama_model_id, whisper_model_id, prompt_size
        self.whisper_config, self.llama_config = whisper_config, llama_config
        if target_layer_ids is None:
            if whisper_model_id not in TARGET_LAYERS:
                raise UserError(f"DeSTA2: no connector layers are defined for '{whisper_model_id}' (the release "
                                f"knows {', '.join(TARGET_LAYERS)}).")
            target_layer_ids = TARGET_LAYERS[whisper_model_id]
        self.target_layer_ids = list(target_layer_ids)
        self.qformer_intermediate_size = qformer_intermediate_size  # BertConfig() default, as the release uses
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return self.llama_config


class QformerConnector(nn.Module):
    """Per target layer: ``qformer(layer_prompts[i], encoder_hidden_states[layer])``; softmax-weighted sum; ``proj``.

    The Q-Former is transformers' ``BertEncoder`` (2 layers, cross-attention). The release builds it directly from a
    fresh ``BertConfig`` (eager attention, no mask), so its prompt self-attention is bidirectional even though the
    config says ``is_decoder``. Here eager attention and ``is_causal=False`` are set explicitly, because with SDPA
    transformers 5 would honour ``is_causal`` (= ``is_decoder``) and silently make it causal.
    """

    def __init__(self, config: Desta2Config) -> None:
        super().__init__()
        width = config.whisper_config.d_model
        self.target_layer_ids = list(config.target_layer_ids)
        self.layer_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(1, config.prompt_size, width)) for _ in self.target_layer_ids])
        self.layer_weights = nn.Parameter(torch.zeros(config.prompt_size, len(self.target_layer_ids)))
        qcfg = BertConfig(num_hidden_layers=2, num_attention_heads=config.whisper_config.encoder_attention_heads,
                          hidden_size=width, intermediate_size=config.qformer_intermediate_size,
                          add_cross_attention=True, is_decoder=True)
        qcfg._attn_implementation = "eager"
        self.qformer = BertEncoder(qcfg)
        for layer in self.qformer.layer:
            layer.attention.self.is_causal = False
        self.proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.llama_config.hidden_size))

    def forward(self, encoder_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        outputs = []
        for idx in self.target_layer_ids:
            states = encoder_hidden_states[idx]
            prompt = self.layer_prompts[self.target_layer_ids.index(idx)].expand(states.shape[0], -1, -1)
            outputs.append(self.qformer(hidden_states=prompt.to(states.dtype),
                                        encoder_hidden_states=states).last_hidden_state)
        stacked = torch.stack(outputs, dim=0).permute(1, 2, 0, 3)  # (b, prompt, layers, width)
        weights = torch.softmax(self.layer_weights, dim=-1).unsqueeze(-1).to(stacked.dtype)
        return self.proj((stacked * weights).sum(dim=2))


class SpeechPerception(nn.Module):
    """``speech_perception``: the full Whisper (ASR + encoder states) and the connector."""

    def __init__(self, config: Desta2Config, whisper: nn.Module | None = None) -> None:
        super().__init__()
        self.whisper = whisper or WhisperForConditionalGeneration(config.whisper_config)
        self.connector = QformerConnector(config)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        encoder = self.whisper.get_encoder()
        states = encoder(input_features.to(encoder.dtype), output_hidden_states=True).hidden_states
        return self.connector(states)


class DestaModel(PreTrainedModel, GenerationMixin):
    """``speech_perception`` + ``llama`` with the release's names; the forward inserts the 64 audio embeddings
    at their placeholder span (the processor lays out the prompt and the transcription)."""

    config_class = Desta2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["WhisperEncoderLayer", "WhisperDecoderLayer", "LlamaDecoderLayer", "BertLayer"]
    _supports_sdpa = True

    def __init__(self, config: Desta2Config, whisper: nn.Module | None = None, llama: nn.Module | None = None):
        super().__init__(config)
        self.speech_perception = SpeechPerception(config, whisper)
        self.llama = llama or AutoModelForCausalLM.from_config(config.llama_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llama.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llama.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                audio_token_start_idx: torch.Tensor | None = None, audio_token_len: torch.Tensor | None = None,
                audio_batch_size: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any):
        """``prepare_llm_input`` + ``llama`` forward of the release, for a left-padded batch."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if input_features is not None and len(input_features) > 0:
            audio = self.speech_perception(input_features).to(inputs_embeds.dtype)
            inputs_embeds = scatter_audio(inputs_embeds, audio, audio_token_start_idx, audio_token_len,
                                          audio_batch_size)
        if position_ids is None and attention_mask is not None and (cache is None or cache.get_seq_length() == 0):
            position_ids = positions_from_mask(attention_mask)
        return self.llama(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any):
        """Audio goes in with the prompt pass only; later steps reuse the cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in AUDIO_INPUTS:
                inputs.pop(key, None)
        return inputs
