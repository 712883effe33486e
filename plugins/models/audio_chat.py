"""The audio path of a processor whose full class also insists on an image and a video processor.

``Qwen2_5OmniProcessor`` and ``Qwen3OmniMoeProcessor`` refuse to be built without a video processor, which needs
torchvision (and an image processor, which needs pillow); neither is needed to hear a clip. :class:`AudioChat` is
what those processors do with text and audio, from their own parts (ARCHITECTURES.md §0.2): the feature extractor
called with the processor's audio arguments, each audio placeholder expanded to the processor's token count, the
tokenizer padding on the left, and the checkpoint's chat template. ``tests/plugins/models/test_qwen_omni.py`` checks
it against the real processor classes token for token and feature for feature.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch


class AudioChat:
    """Feature extractor + tokenizer + chat template, called like the full processor for text and audio."""

    def __init__(self, feature_extractor: Any, tokenizer: Any, chat_template: str | None,
                 audio_kwargs: dict[str, Any], tokens: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.feature_extractor, self.tokenizer, self.chat_template = feature_extractor, tokenizer, chat_template
        self.audio_kwargs = audio_kwargs  # what the processor passes to its feature extractor
        self.tokens = tokens  # valid mel frames per clip -> audio placeholders in the prompt

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: Any) -> "AudioChat":
        """The parts from a checkpoint; the chat template is the processor's (``chat_template.jinja``/``.json``),
        else the tokenizer's."""
        from transformers import AutoTokenizer, ProcessorMixin, WhisperFeatureExtractor

        tokenizer = AutoTokenizer.from_pretrained(source)
        template = ProcessorMixin.get_processor_dict(source)[0].get("chat_template") or tokenizer.chat_template
        return cls(WhisperFeatureExtractor.from_pretrained(source), tokenizer, template, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(out_dir)
        self.feature_extractor.save_pretrained(out_dir)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def features(self, clips: list[Any]) -> dict[str, torch.Tensor]:
        """``input_features`` and ``feature_attention_mask`` as the processor returns them."""
        out = self.feature_extractor(clips, return_tensors="pt", **self.audio_kwargs)
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def __call__(self, text: list[str], audio: list[Any] | None = None, **_: Any) -> dict[str, torch.Tensor]:
        feats = self.features(audio) if audio else {}
        if feats:
            counts = iter(self.tokens(feats["feature_attention_mask"].sum(-1)).tolist())
            token = self.tokenizer.audio_token
            text = [re.sub(re.escape(token), lambda _m: token * next(counts), t) for t in text]
        enc = self.tokenizer(text, padding=True, padding_side="left", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **feats}
