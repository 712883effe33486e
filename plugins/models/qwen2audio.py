"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): Whisper-style audio encoder + Qwen2 decoder LM.

Sources: a hub id (default ``Qwen/Qwen2-Audio-7B-Instruct``; ``Qwen/Qwen2-Audio-7B`` is the base model), a local
directory, or ``tiny`` (a seeded, randomly initialised instance of the real class with an offline processor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.positions import Positions, conv_length, pool_length
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.tiny import byte_level_tokenizer
from lalm_probe.core.vocab import Component

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"


def build_tiny(out_dir: Path) -> None:
    """A 2+8-layer, 64-wide Qwen2-Audio with the real processor and a 5 s window, seeded so every build is identical."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    tok = byte_level_tokenizer(Qwen2Tokenizer, ["<|im_start|>", "<|im_end|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS])
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=5, sampling_rate=16000)  # 5 s windows keep it fast
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    cfg = Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=250),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False),
        audio_token_index=tok.convert_tokens_to_ids(AUDIO_TOKEN))
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class Qwen2Audio(AudioLM):
    name = "qwen2audio"
    description = "Qwen2-Audio (7B Instruct / base): Whisper-style audio encoder + Qwen2 LM"
    default_checkpoint = "Qwen/Qwen2-Audio-7B-Instruct"
    hub_ids = ("Qwen/Qwen2-Audio-7B-Instruct", "Qwen/Qwen2-Audio-7B")
    model_class = "Qwen2AudioForConditionalGeneration"
    tiny = build_tiny
    audio_token = AUDIO_TOKEN
    stacks = (
        # After its layers the encoder average-pools time by 2, then norms and projects into the LM: those extras
        # are read on the pooled positions, one per audio token in the LM.
        Stack("audio_encoder", layers=("model.audio_tower.layers", "audio_tower.layers"), components=bart_layer(),
              extras={"norm": Component(("model.audio_tower.layer_norm", "audio_tower.layer_norm"),
                                        positions="audio_pooled"),
                      "projector": Component(("model.multi_modal_projector", "multi_modal_projector"),
                                             width=lambda m: m.linear.out_features, positions="audio_pooled")}),
        Stack("lm", layers=("model.language_model.layers", "language_model.model.layers"), runs="per_step",
              components=decoder_layer(), final_norm=("model.language_model.norm", "language_model.model.norm"),
              unembed=("lm_head", "language_model.lm_head"), hidden_states="hidden_states"),
    )

    def max_seconds(self) -> float:
        fe = self.processor.feature_extractor  # the processor truncates to one window (30 s)
        return fe.n_samples / fe.sampling_rate

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        # The encoder's stride-2 convolution halves the valid mel frames; the padded window beyond them is ignored.
        frames = conv_length(int(inputs["feature_attention_mask"][clip].sum()))
        return {"audio_encoder": Positions(0, frames, row=clip),
                "audio_pooled": Positions(0, pool_length(frames), row=clip)}


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Qwen2Audio]
