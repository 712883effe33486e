"""The common shape of an audio-language model: an audio encoder feeding a decoder-only LM through a chat template.

Qwen2-Audio, Qwen2.5-Omni, Voxtral, Audio Flamingo 3, Granite Speech and their kin take a chat conversation whose
user turn holds an audio placeholder; the processor renders the template, expands the placeholder to one token per
audio frame and pads the batch. :class:`AudioLM` does all of that from declarations, so a plugin for such a family
states its classes, stacks and placeholder and writes only :meth:`AudioLM.audio_positions` (where a clip's valid
frames sit on the audio encoder's time axis).

Every such model takes the option ``chat_template`` (default true). ``--model NAME:chat_template=false`` feeds the
input without the template: the clip's placeholder (with the markers the template puts around it), then the text,
then the assistant prefix, so the last position is the last token of the input itself (seed 000 reads "the last
token of an input"; the template would make it the assistant header's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np

from .data import Stimulus
from .errors import UserError
from .model import ModelPlugin, Prepared, Prompt
from .positions import Positions, find_tokens, position_ids, token_run, valid_ranges


class AudioLM(ModelPlugin):
    """A decoder-only audio LM fed through its processor's chat template (stacks ``audio_encoder`` and ``lm``)."""

    lens_stack = "lm"
    padding_side = "left"
    option_defaults: ClassVar[dict[str, Any]] = {"chat_template": True}
    pass_position_ids: ClassVar[bool] = True  # mask-derived position ids, so a padded row sees its own positions
    audio_kwarg: ClassVar[str] = "audio"  # the processor's keyword for the clips

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass takes ``chat_template`` beside its own options."""
        super().__init_subclass__(**kwargs)
        cls.option_defaults = {"chat_template": True, **cls.option_defaults}
        cls.option_help = {"chat_template": "false: the input without the chat template (the clip's markup, then "
                                            "the text), so the last position is the input's own last token",
                           **cls.option_help}

    def configure(self, **options: Any) -> "AudioLM":
        super().configure(**options)
        if not self.options["chat_template"] and type(self).render is not AudioLM.render:
            raise UserError(f"Model '{self.name}' builds its own input format, so chat_template=false cannot "
                            "drop the template here.")
        return self

    def conversation(self, item: Stimulus, prompt: Prompt) -> list[dict[str, Any]]:
        """The chat turns for one item: the audio (or the item's text in its place), then the user's text."""
        content: list[dict[str, Any]] = []
        if item.has_audio:
            content.append({"type": "audio", "audio": "placeholder"})
        text = self.user_text(item, prompt)
        if text:
            content.append({"type": "text", "text": text})
        conv = [{"role": "user", "content": content}]
        if prompt.assistant_prefix:
            conv.append({"role": "assistant", "content": [{"type": "text", "text": prompt.assistant_prefix}]})
        return conv

    def user_text(self, item: Stimulus, prompt: Prompt) -> str | None:
        """The text of the user turn: the instruction after a clip; for a text item, its text then the instruction."""
        if item.has_audio:
            return prompt.user
        return "\n".join(t for t in (item.text, prompt.user) if t) or None

    def render(self, item: Stimulus, prompt: Prompt) -> str:
        """The chat template as text; an assistant prefix is continued rather than closed. With
        ``chat_template=false``: the raw input (:meth:`raw_text`)."""
        if not self.options.get("chat_template", True):
            return self.raw_text(item, prompt)
        conv = self.conversation(item, prompt)
        if prompt.assistant_prefix:
            return self.processor.apply_chat_template(conv, tokenize=False, continue_final_message=True)
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def raw_text(self, item: Stimulus, prompt: Prompt) -> str:
        """The input without a chat template: the clip's placeholder markup, the user text, the assistant prefix
        (the tokenizer adds what it always adds, e.g. a BOS token)."""
        text = " ".join(t for t in (self.user_text(item, prompt), prompt.assistant_prefix) if t)
        return (self.audio_markup() if item.has_audio else "") + text

    def audio_markup(self) -> str:
        """The text the chat template writes for one clip: the placeholder with the audio markers around it
        (``<|audio_bos|><|AUDIO|><|audio_eos|>``), read off the template itself so no plugin declares it."""
        if getattr(self, "_markup", None) is None:
            probe = Stimulus("markup", audio=np.zeros(1, dtype=np.float32), sample_rate=self.sample_rate)
            conv = self.conversation(probe, Prompt())
            text = self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
            at = text.find(self.audio_token or "\0")
            if at < 0:
                raise UserError(f"Model '{self.name}': its chat template writes no '{self.audio_token}' for a clip, "
                                "so the raw input cannot be built.")
            start, end = at, at + len(self.audio_token)
            added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            markers = [m for m in (getattr(t, "content", str(t)) for t in added.values())
                       if m and ("audio" in m.lower() or "sound" in m.lower()) and m != self.audio_token]
            grown = True
            while grown:
                grown = False
                for m in markers:
                    if text.startswith(m, end):
                        end, grown = end + len(m), True
                    if text[:start].endswith(m):
                        start, grown = start - len(m), True
            self._markup = text[start:end]
        return self._markup

    def encode(self, texts: list[str], clips: list[np.ndarray]) -> dict[str, Any]:
        """The processor call: tokens with expanded placeholders, features, masks. A template that writes the BOS
        token itself does not get a second one (as the processor's own ``apply_chat_template`` does)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and all(t.startswith(bos) for t in texts) else {}
        return dict(self.processor(text=texts, **{self.audio_kwarg: clips or None}, sampling_rate=self.sample_rate,
                                   return_tensors="pt", padding=True, **special))

    def audio_positions(self, inputs: dict[str, Any], clip: int) -> dict[str, Positions]:
        """Where clip ``clip``'s valid frames sit on the audio encoder's time axis (``audio_encoder``; its row there
        is ``clip``), and on any other audio time axis an extra is read on."""
        raise NotImplementedError

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        texts = [self.render(it, p) for it, p in zip(items, prompts)]
        inputs = self.encode(texts, [a for a in audio if a is not None])
        mask = inputs["attention_mask"]
        if self.pass_position_ids:
            inputs["position_ids"] = position_ids(mask)
        tok = self.tokenizer
        audio_id = tok.convert_tokens_to_ids(self.audio_token) if self.audio_token else None
        rows, clip = [], 0
        for b, (it, prompt, (offset, length)) in enumerate(zip(items, prompts, valid_ranges(mask))):
            valid = inputs["input_ids"][b, offset:offset + length].tolist()
            row: dict[str, Positions] = {}
            spans: dict[str, tuple[int, int]] = {}
            if it.has_audio:
                span = token_run(valid, audio_id) if audio_id is not None else None
                if span is None:
                    raise UserError(f"Item '{it.id}': the processor put no '{self.audio_token}' placeholder in the "
                                    "prompt; the model plugin does not match this processor.")
                spans["audio"] = span
                row.update(self.audio_positions(inputs, clip))
                clip += 1
            text = self.user_text(it, prompt)
            found = find_tokens(valid, tok(text, add_special_tokens=False)["input_ids"]) if text else None
            if found is not None:
                spans["text"] = found
            row["lm"] = Positions(offset, length, spans)
            rows.append(row)
        return Prepared(inputs, rows)
