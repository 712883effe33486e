"""SALMONN (``tsinghua-ee/SALMONN`` 13B v1, ``tsinghua-ee/SALMONN-7B``) on transformers building blocks.

Follows ``bytedance/SALMONN`` (branch ``salmonn``) ``models/salmonn.py``: Whisper's encoder (``speech_encoder``, then
``ln_speech``) and BEATs (``beats``, then ``ln_audio``) are concatenated per frame, cut into 0.33 s windows (17
frames), each window is summarised by one Q-Former query (``speech_Qformer``, ``speech_query_tokens``) and projected
to the LM (``speech_llama_proj``); Vicuna runs LoRA-wrapped (``llama_model.base_model.model.*``). The release
concatenates ``[BOS, prompt-before, speech, prompt-after]`` embeddings; here the processor lays out the same token
sequence with placeholder ids at the speech span and the forward writes the speech embeddings there.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperConfig, WhisperEncoder

from .layout import positions_from_mask, scatter_audio
from .lora import PeftCausalLM, inject_lora
from .salmonn_beats import BEATs, BEATsConfig
from .salmonn_qformer import SpeechQFormer, qformer_config

AUDIO_INPUTS = ("input_features", "raw_wav", "raw_wav_lens", "audio_token_start_idx", "audio_token_len",
                "audio_batch_size")


class SalmonnConfig(PretrainedConfig):
    """The ``model:`` block of the release's ``configs/decode_config.yaml`` plus the three base configs."""

    model_type = "salmonn"
    sub_configs = {"whisper_config": AutoConfig, "llama_config": AutoConfig}

    def __init__(self, whisper_config: Any = None, llama_config: Any = None, beats_config: dict | None = None,
                 num_speech_query_token: int = 1, second_per_window: float = 0.333333,
                 second_stride: float = 0.333333, lora_rank: int = 8, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.1, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
                 qformer: dict | None = None, initializer_range: float = 0.02, **kwargs: Any):
        if isinstance(whisper_config, dict):
            whisper_config = WhisperConfig(**{k: v for k, v in whisper_config.items() if k != "model_type"})
        if isinstance(llama_config, dict):
            llama_config = AutoConfig.for_model(**llama_config)
        self.whisper_config, self.llama_config = copy.deepcopy(whisper_config), copy.deepcopy(llama_config)
        self.beats_config = beats_config  # None: a speech-only SALMONN (no BEATs, no ln_audio)
        self.num_speech_query_token = num_speech_query_token
        self.second_per_window, self.second_stride = second_per_window, second_stride
        self.lora_rank, self.lora_alpha, self.lora_dropout = lora_rank, lora_alpha, lora_dropout
        self.lora_targets = list(lora_targets)
        self.qformer = qformer or {}
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return self.llama_config

    def window(self) -> tuple[int, int]:
        """Kernel and stride in encoder frames, as the release rounds them (it assumes 1500 frames per 30 s)."""
        return round(1500 * self.second_per_window / 30.0), round(1500 * self.second_stride / 30.0)

    def num_windows(self, frames: int) -> int:
        kernel, stride = self.window()
        return (frames - kernel) // stride + 1


class SalmonnModel(PreTrainedModel, GenerationMixin):
    """All SALMONN parts under the release's names; ``forward`` takes the batch ``SalmonnProcessor`` builds."""

    config_class = SalmonnConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["WhisperEncoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: SalmonnConfig, llama: nn.Module | None = None) -> None:
        super().__init__(config)
        width = config.whisper_config.d_model
        self.speech_encoder = WhisperEncoder(config.whisper_config)
        self.ln_speech = nn.LayerNorm(width)
        if config.beats_config is not None:
            self.beats = BEATs(BEATsConfig.from_dict(config.beats_config))
            self.ln_audio = nn.LayerNorm(self.beats.cfg.encoder_embed_dim)
            width += self.beats.cfg.encoder_embed_dim
        qcfg = qformer_config(**config.qformer)
        self.speech_Qformer = SpeechQFormer(qcfg, width)
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, config.num_speech_query_token, qcfg.hidden_size))
        self.speech_llama_proj = nn.Linear(qcfg.hidden_size, config.llama_config.hidden_size)
        lm = llama or AutoModelForCausalLM.from_config(config.llama_config)
        if not any(n.endswith("lora_A") for n, _ in lm.named_modules()):
            inject_lora(lm, config.lora_targets, r=config.lora_rank, alpha=config.lora_alpha,
                        dropout=config.lora_dropout)
        self.llama_model = PeftCausalLM(lm)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            nn.init.normal_(self.speech_query_tokens, std=self.config.initializer_range)

    @property
    def lm(self) -> nn.Module:
        """The LoRA-wrapped ``LlamaForCausalLM`` (``llama_model.base_model.model``)."""
        return self.llama_model.lm

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def encode_speech(self, input_features: torch.Tensor, raw_wav: torch.Tensor | None = None,
                      raw_wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """``encode_speech`` + ``_encode_auditory_feature``: one LM embedding per window, ``(clips, windows, d)``."""
        speech = self.ln_speech(self.speech_encoder(input_features.to(self.speech_encoder.dtype)).last_hidden_state)
        if getattr(self, "beats", None) is not None and raw_wav is not None:
            audio = self.ln_audio(self.beats.extract_features(raw_wav, raw_wav_lens))
            valid = self.beats.output_lengths(raw_wav_lens.to(audio.device))
            # each clip alone is zero-padded (``F.pad``) after ln_audio up to the Whisper length
            audio = audio * (torch.arange(audio.shape[1], device=audio.device)[None, :] < valid[:, None])[..., None]
            if audio.shape[1] > speech.shape[1]:
                raise ValueError("BEATs produced more frames than Whisper; SALMONN truncates audio to the window.")
            audio = nn.functional.pad(audio, (0, 0, 0, speech.shape[1] - audio.shape[1]))
            speech = torch.cat((speech, audio.to(speech.dtype)), dim=-1)
        b, t, c = speech.shape
        kernel, stride = self.config.window()
        windows = speech.unfold(1, kernel, stride)  # (b, L, c, kernel)
        windows = windows.permute(0, 1, 3, 2).reshape(-1, kernel, c)
        queries = self.speech_query_tokens.expand(windows.shape[0], -1, -1).to(windows.dtype)
        query = self.speech_Qformer(queries, windows)  # (clips * windows, queries, width): windows on the batch axis
        # The release projects then views per clip; projecting the per-clip view is the same product, and makes the
        # projector's input (the Q-Former output) and output readable per clip, windows on the time axis.
        return self.speech_llama_proj(query.reshape(b, -1, query.shape[-1]))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
                raw_wav: torch.Tensor | None = None, raw_wav_lens: torch.Tensor | None = None,
                audio_token_start_idx: torch.Tensor | None = None, audio_token_len: torch.Tensor | None = None,
                audio_batch_size: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None, **kwargs: Any):
        """Embed, write each clip's window embeddings at its speech span, run the LoRA-wrapped LM."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if input_features is not None and len(input_features) > 0:
            speech = self.encode_speech(input_features, raw_wav, raw_wav_lens).to(inputs_embeds.dtype)
            inputs_embeds = scatter_audio(inputs_embeds, speech, audio_token_start_idx, audio_token_len,
                                          audio_batch_size)
        if position_ids is None and attention_mask is not None and (cache is None or cache.get_seq_length() == 0):
            position_ids = positions_from_mask(attention_mask)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=use_cache, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, is_first_iteration: bool | None = False, **kwargs: Any):
        """Audio goes in with the prompt pass only; later steps reuse the cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in AUDIO_INPUTS:
                inputs.pop(key, None)
        return inputs
