"""Seeded tiny Qwen2.5-Omni and Qwen3-Omni thinkers (the real classes, random weights) with offline processors.

Each builder writes the thinker (``save_pretrained``), a byte-level tokenizer carrying the family's named special
tokens and chat template, and the Whisper feature extractor: the parts :class:`~.audio_chat.AudioChat` loads. The
vision tower exists (the thinker class always builds one) but is one block wide and never runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Qwen2.5-Omni's chat template as the checkpoints ship it (Qwen/Qwen2.5-Omni-7B, chat_template.json): a default
# system turn, the audio as <|audio_bos|><|AUDIO|><|audio_eos|> where it stands in the user's content.
QWEN2_5_OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
    "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == 'audio' or 'audio' in content or "
    "'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or "
    "'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen3-Omni's turn format (Qwen3 chat format; no default system turn; media as <|audio_start|><|audio_pad|>
# <|audio_end|> where they stand). The released template also renders tools and reasoning history, which a prompt
# of one user turn (and an optional start of the answer) never reaches; real checkpoints bring their own.
QWEN3_OMNI_TEMPLATE = (
    "{%- for message in messages %}{%- if message.content is string %}{%- set text = message.content %}{%- else %}"
    "{%- set ns = namespace(text='') %}{%- for item in message.content %}"
    "{%- if item.type == 'audio' or 'audio' in item or 'audio_url' in item %}"
    "{%- set ns.text = ns.text + '<|audio_start|><|audio_pad|><|audio_end|>' %}"
    "{%- elif item.type == 'image' or 'image' in item or 'image_url' in item %}"
    "{%- set ns.text = ns.text + '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{%- elif item.type == 'video' or 'video' in item %}"
    "{%- set ns.text = ns.text + '<|vision_start|><|video_pad|><|vision_end|>' %}"
    "{%- elif 'text' in item %}{%- set ns.text = ns.text + item.text %}{%- endif %}{%- endfor %}"
    "{%- set text = ns.text %}{%- endif %}{{- '<|im_start|>' + message.role + '\\n' + text + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN2_5_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                  "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                  "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
QWEN3_TOKENS = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}


def _tokenizer(named: dict[str, str], template: str) -> Any:
    """A byte-level Qwen2 tokenizer (one token per byte, no merges) with the family's named special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {t: i for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()))}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens=named)
    tok.chat_template = template
    return tok


def _ids(tok: Any) -> dict[str, int]:
    """The thinker config's token ids (``vision_start_token_id`` is read by ``get_rope_index`` though undeclared)."""
    return dict(audio_token_id=tok.audio_token_id, image_token_id=tok.image_token_id,
                video_token_id=tok.video_token_id, audio_start_token_id=tok.convert_tokens_to_ids(tok.audio_bos_token),
                audio_end_token_id=tok.convert_tokens_to_ids(tok.audio_eos_token),
                vision_start_token_id=tok.convert_tokens_to_ids(tok.vision_bos_token),
                vision_end_token_id=tok.convert_tokens_to_ids(tok.vision_eos_token),
                user_token_id=tok.convert_tokens_to_ids("<|im_start|>"))


def _save(model: Any, tok: Any, out_dir: Path) -> None:
    from transformers import WhisperFeatureExtractor

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    # The real extractors pad to 30 s (2.5) or 300 s (3); 2 s windows keep the tiny fast. The encoders read only the
    # valid frames, so the window length changes nothing else.
    WhisperFeatureExtractor(feature_size=128, chunk_length=2, sampling_rate=16000).save_pretrained(out_dir)


def build_qwen2_5_omni(out_dir: Path) -> None:
    """A 2-layer audio tower + 4-layer, 64-wide Qwen2.5-Omni thinker, seeded."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    tok = _tokenizer(QWEN2_5_TOKENS, QWEN2_5_OMNI_TEMPLATE)
    cfg = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          d_model=64, max_source_positions=1500, n_window=100, output_dim=64),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0], window_size=112),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        **_ids(tok))
    torch.manual_seed(0)
    _save(Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval(), tok, out_dir)


def build_qwen3_omni(out_dir: Path) -> None:
    """A 2-layer audio tower + 4-layer, 64-wide Qwen3-Omni MoE thinker (4 experts, 2 per token), seeded."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    tok = _tokenizer(QWEN3_TOKENS, QWEN3_OMNI_TEMPLATE)
    cfg = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          d_model=64, output_dim=64, downsample_hidden_size=16, n_window=50, n_window_infer=400),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]}),
        **_ids(tok))
    torch.manual_seed(0)
    _save(Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval(), tok, out_dir)
