"""A seeded tiny ``Gemma3nForConditionalGeneration`` with the real ``Gemma3nProcessor`` (built offline: a
byte-fallback Gemma tokenizer with the released vocabulary layout, the audio feature extractor, Siglip's PIL image
processor), and the stand-in that replaces the vision tower (timm's MobileNetV5) while a model is built."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# The released chat template's format: <bos>, then per turn "<start_of_turn>{user|model}\n" + content (text trimmed,
# <audio_soft_token> per clip, which the processor expands to "\n\n<start_of_audio>" + 188 x <audio_soft_token> +
# "<end_of_audio>\n\n") + "<end_of_turn>\n"; a system turn is folded into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set c = messages[0]['content'] -%}{%- set prefix = (c if c is string else c[0]['text']) + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif part['type'] == 'image' -%}{{ '<image_soft_token>' }}{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
NAMED = {"boi_token": "<start_of_image>", "boa_token": "<start_of_audio>", "eoi_token": "<end_of_image>",
         "image_token": "<image_soft_token>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}


class NoVision(torch.nn.Module):
    """Stands in for the vision tower: this plugin takes speech and text, and timm (the tower) needs torchvision."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


@contextmanager
def without_vision() -> Iterator[None]:
    """While a Gemma 3n model is built or loaded, its vision tower is a parameter-free :class:`NoVision` (the
    checkpoint's vision weights are left unloaded); every other part is the real one."""
    from transformers import AutoModel
    from transformers.models.gemma3n import modeling_gemma3n as modeling

    class Auto:
        @staticmethod
        def from_config(config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
            if config.model_type == "gemma3n_vision":
                return NoVision(config)
            return AutoModel.from_config(config, *args, **kwargs)

    modeling.AutoModel = Auto
    try:
        yield
    finally:
        modeling.AutoModel = AutoModel


def tokenizer() -> Any:
    """Gemma's layout on a tiny vocabulary: specials, 256 byte-fallback tokens, printable ASCII and "▁", the turn and
    start-of-media tokens (the text vocabulary, T ids), then end-of-image at T, the image soft token at T+1, the
    vision hard tokens, end-of-audio at T+128 and the audio soft token at T+129, where the model's embedders
    expect them."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"<0x{i:02X}>": 4 + i for i in range(256)}}
    for piece in ["▁", *map(chr, range(33, 127)), "<start_of_turn>", "<end_of_turn>", NAMED["boi_token"],
                  NAMED["boa_token"], NAMED["eoi_token"], NAMED["image_token"],
                  *(f"<unused_vision_{i}>" for i in range(126)), NAMED["eoa_token"], NAMED["audio_token"]]:
        vocab.setdefault(piece, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                          pad_token="<pad>", add_bos_token=True, extra_special_tokens=NAMED,
                          additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


def build_tiny(out_dir: Path) -> None:
    """4 LM layers (64 wide; the last two share the first two's keys and values, the first is activation-sparse, as
    in the release) with 4 AltUp streams, a 2-block 64-wide audio Conformer; seeded so every build is identical.
    The sliding window is the release's 512: a narrower one would hide the clip, which fills the first of its 188
    soft tokens, from the prompt's last position in the sliding layers."""
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        SiglipImageProcessorPil,
    )

    tok = tokenizer()
    text = tok.convert_tokens_to_ids(NAMED["eoi_token"])  # T: the text vocabulary ends where the vision tokens start
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3nConfig(
        text_config=dict(vocab_size=text + 256, vocab_size_per_layer_input=text, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size_per_layer_input=8, laurel_rank=8, altup_num_inputs=4, num_kv_shared_layers=2,
                         sliding_window=512, max_position_embeddings=1024,
                         activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         pad_token_id=0, bos_token_id=2, eos_token_id=[1, ids("<end_of_turn>")]),
        audio_config=dict(hidden_size=64, input_feat_size=128, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                          sscp_conv_channel_size=[16, 8], vocab_size=128, vocab_offset=text + 128),
        vision_config=dict(hidden_size=64, vocab_size=128, vocab_offset=text, label_names=["unused"]),
        audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=4, boi_token_id=ids(NAMED["boi_token"]),
        eoi_token_id=text, image_token_id=text + 1, boa_token_id=ids(NAMED["boa_token"]), eoa_token_id=text + 128,
        audio_token_id=text + 129)
    torch.manual_seed(0)
    with without_vision():
        model = Gemma3nForConditionalGeneration(cfg).eval()
    model.save_pretrained(out_dir)
    Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=SiglipImageProcessorPil(),
                     tokenizer=tok, chat_template=CHAT_TEMPLATE, audio_seq_length=188,
                     image_seq_length=4).save_pretrained(out_dir)
