"""Qwen2-Audio (``Qwen2AudioForConditionalGeneration``): Whisper-style audio encoder + Qwen2 decoder LM.

Sources: a hub id (default ``Qwen/Qwen2-Audio-7B-Instruct``; ``Qwen/Qwen2-Audio-7B`` is the base model), a local
directory, or ``tiny`` (a seeded, randomly initialised instance of the real class with an offline processor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import ModelPlugin, Positions, Prepared, Prompt, Stack, load_pretrained
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.tiny import byte_level_tokenizer, tiny_checkpoint

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"


class Qwen2Audio(ModelPlugin):
    name = "qwen2audio"
    description = "Qwen2-Audio (7B Instruct / base): Whisper-style audio encoder + Qwen2 LM"
    default_checkpoint = "Qwen/Qwen2-Audio-7B-Instruct"
    lens_stack = "lm"
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.layers", "audio_tower.layers"),
              components={"out": "", "attn": "self_attn", "fc1": "fc1", "fc2": "fc2",
                          "attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
              extras={"projector": ("model.multi_modal_projector", "multi_modal_projector")}),
        Stack("lm", layers=("model.language_model.layers", "language_model.model.layers"), runs="per_step",
              components={"out": "", "attn": "self_attn", "mlp": "mlp", "attn_norm": "input_layernorm",
                          "mlp_norm": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                          "down": "mlp.down_proj"},
              final_norm=("model.language_model.norm", "language_model.model.norm"),
              unembed=("lm_head", "language_model.lm_head")),
    )

    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu", dtype: str = "float32",
             device_map: str | None = None) -> "Qwen2Audio":
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

        source = tiny_checkpoint("qwen2audio", build_tiny) if checkpoint == "tiny" else checkpoint
        model, processor = load_pretrained(Qwen2AudioForConditionalGeneration, AutoProcessor, source,
                                           device=device, dtype=dtype, device_map=device_map, plugin=cls.name)
        processor.tokenizer.padding_side = "left"
        return cls(model, processor, checkpoint)

    def _chat(self, item: Stimulus, prompt: Prompt) -> str:
        content: list[dict[str, Any]] = []
        if item.has_audio:
            content.append({"type": "audio", "audio": "placeholder"})
            text = prompt.user
        else:  # a text stimulus: its text takes the audio's place, followed by the same instruction
            text = "\n".join(t for t in (item.text, prompt.user) if t)
        if text:
            content.append({"type": "text", "text": text})
        conv = [{"role": "user", "content": content}]
        if prompt.assistant_prefix:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": prompt.assistant_prefix}]})
            return self.processor.apply_chat_template(conv, tokenize=False, continue_final_message=True)
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        texts = [self._chat(it, p) for it, p in zip(items, prompts)]
        clips = [a for a in audio if a is not None]
        enc = self.processor(text=texts, audio=clips or None, sampling_rate=self.sample_rate,
                             return_tensors="pt", padding=True)
        inputs = dict(enc)
        mask = inputs["attention_mask"]
        # Left padding: derive positions from the mask so a padded row sees the same positions as when alone.
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        tok = self.tokenizer
        audio_id, eos_id, im_start = (tok.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_EOS, "<|im_start|>"))
        rows, clip = [], 0
        for b, ids in enumerate(inputs["input_ids"].tolist()):
            length = int(mask[b].sum())
            offset = len(ids) - length
            valid = ids[offset:]
            spans: dict[str, tuple[int, int]] = {}
            row: dict[str, Positions] = {}
            if audio_id in valid:
                where = [i for i, t in enumerate(valid) if t == audio_id]
                spans["audio"] = (where[0], where[-1] + 1)
                text_start = valid.index(eos_id, where[-1]) + 1
                frames = int(inputs["feature_attention_mask"][clip].sum())
                row["audio_encoder"] = Positions(0, (frames - 1) // 2 + 1, row=clip)
                clip += 1
            else:
                starts = [i for i, t in enumerate(valid) if t == im_start]
                user = starts[1] if len(starts) > 1 else starts[0]
                text_start = user + len(tok("user\n", add_special_tokens=False)["input_ids"]) + 1
            text_end = next((i for i in range(text_start, length) if valid[i] == tok.convert_tokens_to_ids("<|im_end|>")),
                            length)
            if text_end > text_start:
                spans["text"] = (text_start, text_end)
            row["lm"] = Positions(offset, length, spans)
            rows.append(row)
        return Prepared(inputs, rows)


def build_tiny(out_dir: Path) -> None:
    """A 2+8-layer, 64-wide Qwen2-Audio with the real processor, seeded so every build is identical."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              Qwen2Tokenizer, WhisperFeatureExtractor)

    tok = byte_level_tokenizer(Qwen2Tokenizer, ["<|im_start|>", "<|im_end|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS])
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=2, sampling_rate=16000)  # 2 s windows keep it fast
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    cfg = Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=100),
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


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Qwen2Audio]
