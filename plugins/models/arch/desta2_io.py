"""DeSTA2 inputs and loading: the release's two-stage prompt (transcribe, then chat), assembly from its sources.

Prompt (``kehanlu/DeSTA2`` ``desta/modeling_desta.py`` ``DestaModel.chat`` / ``process_text``): the messages, with
``{"role": "audio", "content": <path>}``, go through the Llama 3 chat template; the text is split at the path, the
Whisper transcription is put right after it, ``audio_position = len(tokenize(left))`` and ``tokenizer(left + right)``
(which adds a second ``<|begin_of_text|>``) gets the 64 audio embeddings inserted at index ``audio_position`` -- one
token earlier than the split, since that count misses the added BOS. Reproduced as is.

Loading: ``config.json`` names ``whisper_model_id`` and ``llama_model_id``; ``qformer_connector.pth`` holds the
connector. The release loads Whisper in float32 and Llama in bfloat16; here one ``dtype`` applies to all parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.errors import UserError

from .desta2 import Desta2Config, DestaModel
from .layout import Batch, RowSpans, left_pad, positions_from_mask, token_span, whisper_frames
from .sources import assign, base_model_source, fetch, read_json, torch_load
from .tiny import LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIALS, byte_tokenizer, tiny_llama, tiny_whisper

WHAT = "DeSTA2"
AUDIO_MARK = "<|desta2-audio-path|>"  # stands where the release's chat text holds the audio file path
DEFAULT_SYSTEM = "You are a helpful voice assistant."  # the README's example


class Desta2Processor:
    """Messages + audio + transcription -> left-padded batch with a 64-token audio span per audio row."""

    def __init__(self, tokenizer: Any, whisper_processor: Any, *, prompt_size: int = 64) -> None:
        self.tokenizer, self.whisper_processor, self.prompt_size = tokenizer, whisper_processor, prompt_size
        self.filler_id = tokenizer.eos_token_id  # overwritten by the audio embeddings; the release pads with EOS too

    def features(self, audios: Sequence[np.ndarray], sampling_rate: int = 16000) -> torch.Tensor:
        """Whisper log-mel features padded to the full window (the release's ``load_audio``)."""
        fe = self.whisper_processor.feature_extractor
        return fe([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=sampling_rate,
                  return_tensors="pt").input_features

    @torch.no_grad()
    def transcribe(self, model: DestaModel, features: torch.Tensor, **generate_kwargs: Any) -> list[str]:
        """``SpeechPerception.generate``: Whisper's own generation config, special tokens skipped when decoding."""
        whisper = model.speech_perception.whisper
        ids = whisper.generate(input_features=features.to(whisper.device, whisper.dtype), **generate_kwargs)
        ids = ids.sequences if hasattr(ids, "sequences") else ids
        return self.whisper_processor.batch_decode(ids, skip_special_tokens=True)

    @staticmethod
    def messages(prompt: str | None, *, audio: bool, system: str | None = DEFAULT_SYSTEM) -> list[dict[str, str]]:
        """The README's message list: system, the audio turn, then the user's prompt."""
        out = [{"role": "system", "content": system}] if system else []
        if audio:
            out.append({"role": "audio", "content": AUDIO_MARK})
        if prompt:
            out.append({"role": "user", "content": prompt})
        return out

    def __call__(self, messages: Sequence[list[dict[str, str]]], audios: Sequence[np.ndarray | None],
                 transcriptions: Sequence[str | None], *, sampling_rate: int = 16000,
                 assistant_prefixes: Sequence[str | None] | None = None,
                 user_texts: Sequence[str | None] | None = None) -> Batch:
        """Build a batch; ``transcriptions[b]`` is what Whisper said for row ``b`` (see :meth:`transcribe`)."""
        rows_ids, layouts = [], []
        for b, (msgs, audio) in enumerate(zip(messages, audios)):
            context = self.tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)
            context += (assistant_prefixes[b] if assistant_prefixes else None) or ""
            lay: dict[str, Any] = {"audio": None, "extra": {}}
            if audio is None:
                if AUDIO_MARK in context:
                    raise UserError(f"{WHAT}: row {b} has an audio turn but no audio.")
                full, insert_at, trans = context, None, ""
            else:
                if context.count(AUDIO_MARK) != 1:
                    raise UserError(f"{WHAT}: row {b} needs exactly one audio turn (role 'audio').")
                left, right = context.split(AUDIO_MARK)
                trans = transcriptions[b] or ""
                full = left + trans + right
                insert_at = len(self.tokenizer(left, add_special_tokens=False)["input_ids"])
            enc = self.tokenizer(full, return_offsets_mapping=True)  # adds BOS, as the release's call does
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            if insert_at is not None:
                ids[insert_at:insert_at] = [self.filler_id] * self.prompt_size
                offsets[insert_at:insert_at] = [(-1, -1)] * self.prompt_size
                lay["audio"] = (insert_at, insert_at + self.prompt_size)
                start = len(left)
                if trans:
                    lay["extra"]["transcription"] = token_span(offsets, start, start + len(trans))
            user = user_texts[b] if user_texts else None
            at = full.rfind(user) if user else -1
            lay["text"] = token_span(offsets, at, at + len(user)) if user and at >= 0 else None
            rows_ids.append(ids)
            layouts.append(lay)
        input_ids, mask = left_pad(rows_ids, self.tokenizer.eos_token_id)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                  "position_ids": positions_from_mask(mask)}
        clips = [a for a in audios if a is not None]
        rows, clip, starts = [], 0, []
        fe = self.whisper_processor.feature_extractor
        lengths = iter([len(a) for a in clips])
        for ids, lay in zip(rows_ids, layouts):
            offset = input_ids.shape[1] - len(ids)
            has = lay["audio"] is not None
            if has:
                starts.append(offset + lay["audio"][0])
            frames = whisper_frames(next(lengths), fe.hop_length, fe.nb_max_frames) if has else None
            rows.append(RowSpans(offset, len(ids), lay["audio"], lay["text"], frames, clip if has else None,
                                 {k: v for k, v in lay["extra"].items() if v},
                                 {"speech_perception.whisper": frames} if has else {}))
            clip += int(has)
        if clips:
            inputs.update(input_features=self.features(clips, sampling_rate),
                          audio_token_start_idx=torch.tensor(starts),
                          audio_token_len=torch.full((len(clips),), self.prompt_size),
                          audio_batch_size=torch.tensor([int(lay["audio"] is not None) for lay in layouts]))
        return Batch(inputs, rows)


def load_desta2(source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                device_map: str | dict | None = None, whisper_model: str | None = None,
                llama_model: str | None = None) -> tuple[DestaModel, Desta2Processor]:
    """Assemble DeSTA2 from its checkpoint (``config.json`` + ``qformer_connector.pth``) and its two base models.

    ``whisper_model`` / ``llama_model`` override ``whisper_model_id`` / ``llama_model_id`` (e.g. local copies);
    without them a local checkpoint directory's own ``<dir>/<model id>`` folders are used when present.
    The release's remote code (``trust_remote_code``) is not offered: its config and module ``__init__`` download
    both base models from the hub by id (so local copies and offline use are impossible), and it was never run on
    transformers 5 here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperForConditionalGeneration, WhisperProcessor

    src = str(source)
    raw = read_json(src, "config.json", what=WHAT)
    if raw.get("model_type") != "DestaModel":
        raise UserError(f"{WHAT}: '{src}' is not a DeSTA2 checkpoint (model_type {raw.get('model_type')!r}).")
    connector = torch_load(fetch(src, "qformer_connector.pth", what=WHAT), what=WHAT)
    whisper_src = whisper_model or base_model_source(src, raw["whisper_model_id"])
    llama_src = llama_model or base_model_source(src, raw["llama_model_id"])
    kwargs: dict[str, Any] = {"dtype": dtype, **({"device_map": device_map} if device_map else {})}
    try:
        whisper = WhisperForConditionalGeneration.from_pretrained(whisper_src, dtype=dtype)
        llama = AutoModelForCausalLM.from_pretrained(llama_src, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(llama_src)
        wproc = WhisperProcessor.from_pretrained(whisper_src)
    except (OSError, ValueError) as exc:
        raise UserError(f"{WHAT}: could not load a base model ({str(exc).splitlines()[0][:160]}). Download "
                        f"'{whisper_src}' and '{llama_src}' (`hf download <id>`) and pass whisper_model= / "
                        "llama_model= local directories.") from None
    config = Desta2Config(llama_model_id=raw["llama_model_id"], whisper_model_id=raw["whisper_model_id"],
                          prompt_size=raw.get("prompt_size", 64), whisper_config=whisper.config,
                          llama_config=llama.config, target_layer_ids=raw.get("target_layer_ids"),
                          qformer_intermediate_size=raw.get("qformer_intermediate_size", 3072))
    with torch.device("meta"):
        model = DestaModel(config, whisper=whisper, llama=llama)
    assign(model.speech_perception.connector, connector, what=f"{WHAT} connector", dtype=dtype)
    first = next(llama.parameters()).device if device_map else torch.device(device)
    model.speech_perception.to(first)
    if not device_map:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = llama.generation_config.eos_token_id
    tokenizer.padding_side = "left"
    return model.eval(), Desta2Processor(tokenizer, wproc, prompt_size=config.prompt_size)


def build_tiny_desta2(out_dir: Path, *, seed: int = 0) -> tuple[dict[str, Path], DestaModel]:
    """``whisper/``, ``llama/`` (base models, with tokenizers) and ``desta2/`` (``config.json`` naming them and
    ``qformer_connector.pth``), the release layout at 64 wide; and the in-memory model they describe."""
    out = {k: Path(out_dir) / k for k in ("whisper", "llama", "desta2")}
    whisper, wproc = tiny_whisper(80, seed=seed)
    whisper.save_pretrained(out["whisper"])
    wproc.save_pretrained(out["whisper"])
    tok = byte_tokenizer(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
                         chat_template=LLAMA3_CHAT_TEMPLATE)
    llama = tiny_llama(len(tok), seed=seed + 1, bos=tok.bos_token_id, eos=tok.eos_token_id)
    llama.save_pretrained(out["llama"])
    tok.save_pretrained(out["llama"])
    fields = {"llama_model_id": "tiny/llama", "whisper_model_id": "tiny/whisper", "prompt_size": 8,
              "target_layer_ids": [1, 2], "qformer_intermediate_size": 128}
    config = Desta2Config(whisper_config=whisper.config, llama_config=llama.config, **fields)
    torch.manual_seed(seed + 2)
    model = DestaModel(config, whisper=whisper, llama=llama)
    with torch.no_grad():
        model.speech_perception.connector.layer_weights.normal_()
    out["desta2"].mkdir(parents=True, exist_ok=True)
    torch.save(model.speech_perception.connector.state_dict(), out["desta2"] / "qformer_connector.pth")
    (out["desta2"] / "config.json").write_text(json.dumps({"model_type": "DestaModel", **fields}, indent=2))
    return out, model.eval()
