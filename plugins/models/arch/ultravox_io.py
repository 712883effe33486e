"""Ultravox 0.5 inputs and loading: the release's processor and prompt, assembly from its three sources, a tiny twin.

Processor: ``fixie-ai/ultravox`` ``ultravox/model/ultravox_processing.py`` (Feb 2025 revision, what the v0.5 hub
repositories ship) and the prompt of ``ultravox_pipeline.py``. Loading: the checkpoint's ``config.json`` names its
audio and text base models (``audio_model_id``, ``text_model_id``); their weights come from there (or from local
directories the user passes) and the checkpoint's own ``model.safetensors`` (the projector and, from v0.5 on, the
fine-tuned encoder) is applied on top, as ``UltravoxModel.from_pretrained`` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.errors import UserError

from .layout import Batch, RowSpans, left_pad, positions_from_mask, token_span
from .sources import assign, base_model_source, fetch, read_json, read_tensors, weight_files
from .tiny import LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIALS, byte_tokenizer, tiny_llama, tiny_whisper
from .ultravox import UltravoxConfig, UltravoxModel

PLACEHOLDER = "<|audio|>"
WHAT = "Ultravox"


class UltravoxProcessor:
    """Text with one ``<|audio|>`` placeholder per row -> left-padded batch with the audio span filled in.

    Per clip (chunks of at most ``audio_context_size`` mel frames) the placeholder becomes
    ``ceil(mel_frames / (encoder_ds_factor * stack_factor))`` copies of the tokenizer's EOS token.
    """

    def __init__(self, tokenizer: Any, feature_extractor: Any, *, stack_factor: int = 8, encoder_ds_factor: int = 2,
                 audio_context_size: int = 3000) -> None:
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.stack_factor, self.encoder_ds_factor = stack_factor, encoder_ds_factor
        self.audio_context_size = audio_context_size
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.replacement_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    def render(self, prompt: str | None, *, audio: bool, system: str | None = None,
               assistant_prefix: str | None = None, chat_template: bool = True) -> str:
        """The chat text ``UltravoxPipeline.preprocess`` builds: the user turn is the prompt, with `` <|audio|>``
        appended when audio is given and the prompt has no placeholder (``<|audio|>`` alone without a prompt).
        Without the chat template: BOS, the clip, the prompt, the assistant prefix (the input's own last token
        is last)."""
        if not chat_template:
            text = " ".join(t for t in (prompt, assistant_prefix) if t)
            return (self.tokenizer.bos_token or "") + (PLACEHOLDER if audio else "") + text
        content = prompt or ""
        if audio and PLACEHOLDER not in content:
            content = f"{content} {PLACEHOLDER}" if content else PLACEHOLDER
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return text + (assistant_prefix or "")

    def features(self, audio: np.ndarray, sampling_rate: int) -> tuple[list[torch.Tensor], list[int]]:
        """Mel chunks of one clip and their valid frame counts (the release pads to a hop multiple, then chunks)."""
        hop = self.feature_extractor.hop_length
        audio = np.asarray(audio, dtype=np.float32)
        if len(audio) < 2 * hop:
            audio = np.pad(audio, (0, 2 * hop - len(audio)))
        x = self.feature_extractor([audio], sampling_rate=sampling_rate, padding="longest", pad_to_multiple_of=hop,
                                   truncation=False, return_attention_mask=True, return_tensors="pt")
        mel, total = x.input_features[0], int(x.attention_mask.sum())
        chunks, lens = [], []
        for start in range(0, total, self.audio_context_size):
            chunk = mel[:, start:start + self.audio_context_size]
            if start > 0 and chunk.shape[-1] < self.audio_context_size:
                chunk = torch.nn.functional.pad(chunk, (0, self.audio_context_size - chunk.shape[-1]))
            chunks.append(chunk)
            lens.append(min(total - start, self.audio_context_size))
        return chunks, lens

    def __call__(self, texts: Sequence[str], audios: Sequence[np.ndarray | None], *, sampling_rate: int = 16000,
                 user_texts: Sequence[str | None] | None = None) -> Batch:
        """Build a batch. ``user_texts[b]`` (optional) is the plain text whose tokens form row ``b``'s text span."""
        rows_ids: list[list[int]] = []
        layouts: list[dict[str, Any]] = []
        clips: list[torch.Tensor] = []
        clip_lens: list[int] = []
        token_lens: list[int] = []
        starts: list[int] = []
        for b, (text, audio) in enumerate(zip(texts, audios)):
            parts = text.split(PLACEHOLDER)
            if (audio is None) != (len(parts) == 1) or len(parts) > 2:
                raise UserError(f"{WHAT}: row {b} needs exactly one '{PLACEHOLDER}' when it has audio, none without.")
            ids: list[int] = []
            offsets: list[tuple[int, int]] = []
            lay: dict[str, Any] = {"audio": None, "frames": None, "clips": 0, "starts": []}
            char0 = 0
            for i, part in enumerate(parts):
                enc = self.tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                offsets += [(a + char0, e + char0) for a, e in enc["offset_mapping"]]
                char0 += len(part) + len(PLACEHOLDER)
                if i == 0 and audio is not None:
                    first, frames = len(ids), 0
                    for chunk, n in zip(*self.features(audio, sampling_rate)):
                        k = math.ceil(n / (self.encoder_ds_factor * self.stack_factor))
                        lay["starts"].append(len(ids))
                        token_lens.append(k)
                        clips.append(chunk)
                        clip_lens.append(n)
                        frames += (n - 1) // 2 + 1  # encoder frames of this chunk
                        ids += [self.replacement_id] * k
                        offsets += [(-1, -1)] * k
                    lay.update(audio=(first, len(ids)), frames=frames, clips=len(lay["starts"]))
            user = user_texts[b] if user_texts else None
            at = text.rfind(user) if user else -1
            lay["text"] = token_span(offsets, at, at + len(user)) if user and at >= 0 else None
            rows_ids.append(ids)
            layouts.append(lay)
        input_ids, mask = left_pad(rows_ids, self.tokenizer.pad_token_id)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                  "position_ids": positions_from_mask(mask)}
        rows, clip = [], 0
        for ids, lay in zip(rows_ids, layouts):
            offset = input_ids.shape[1] - len(ids)
            starts += [offset + s for s in lay["starts"]]
            rows.append(RowSpans(offset, len(ids), lay["audio"], lay["text"], lay["frames"],
                                 clip if lay["clips"] else None,
                                 encoder_frames={"audio_tower": lay["frames"]} if lay["clips"] else {}))
            clip += lay["clips"]
        if clips:
            width = max(c.shape[-1] for c in clips)
            inputs.update(
                audio_values=torch.stack([torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in clips]),
                audio_lens=torch.tensor(clip_lens), audio_token_len=torch.tensor(token_lens),
                audio_token_start_idx=torch.tensor(starts),
                audio_batch_size=torch.tensor([lay["clips"] for lay in layouts]))
        return Batch(inputs, rows)


def _sub_config(source: str, what: str) -> dict[str, Any]:
    return read_json(source, "config.json", what=what)


def load_ultravox(source: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  device_map: str | dict | None = None, audio_model: str | None = None,
                  text_model: str | None = None, tokenizer: str | None = None,
                  trust_remote_code: bool = False) -> tuple[UltravoxModel, UltravoxProcessor]:
    """Assemble a released Ultravox from its checkpoint (hub id or directory) and its two base models.

    ``audio_model`` / ``text_model`` override the checkpoint's ``audio_model_id`` / ``text_model_id`` (local copies);
    without them a local checkpoint directory's own ``<dir>/<model id>`` folders are used when present.
    ``trust_remote_code`` is refused: the hub code is written for transformers 4.4x and calls what transformers 5
    removed (``transformers.modeling_utils._init_weights`` when building the tower,
    ``ModuleUtilsMixin.get_extended_attention_mask`` in its encoder forward); it also imports ``peft``/``accelerate``.
    """
    if trust_remote_code:
        raise UserError(f"{WHAT}: the release's remote code targets transformers 4.x and does not load on "
                        "transformers 5; this loader rebuilds the model from its weights instead.")
    from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, WhisperFeatureExtractor

    src = str(source)
    raw = read_json(src, "config.json", what=WHAT)
    if raw.get("model_type") != "ultravox":
        raise UserError(f"{WHAT}: '{src}' is not an Ultravox checkpoint (model_type {raw.get('model_type')!r}).")
    trained = read_tensors(weight_files(src, what=WHAT), what=WHAT)
    audio_src = audio_model or base_model_source(src, raw.get("audio_model_id"))
    text_src = text_model or base_model_source(src, raw.get("text_model_id"))
    audio_cfg = _sub_config(audio_src, f"{WHAT} audio encoder") if audio_src else raw.get("audio_config")
    text_cfg = _sub_config(text_src, f"{WHAT} language model") if text_src else raw.get("text_config")
    if audio_cfg is None or text_cfg is None:
        raise UserError(f"{WHAT}: '{src}' names no audio/text base model and embeds no config for it.")
    fields = {k: raw[k] for k in ("stack_factor", "hidden_size", "projector_act", "norm_init",
                                  "audio_latency_block_size") if k in raw}
    fields["projector_ln_mid"] = "multi_modal_projector.ln_mid.weight" in trained
    config = UltravoxConfig(audio_config=audio_cfg, text_config=text_cfg, audio_model_id=audio_src,
                            text_model_id=text_src, **fields)
    lm = None
    if text_src:
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                text_src, dtype=dtype, **({"device_map": device_map} if device_map else {}))
        except (OSError, ValueError) as exc:
            raise UserError(f"{WHAT}: could not load the language model '{text_src}' "
                            f"({str(exc).splitlines()[0][:120]}). Download it (`hf download {text_src}`) and pass "
                            "text_model=<local dir>.") from None
    with torch.device("meta"):  # the parts read below are assigned, not initialised
        model = UltravoxModel(config, language_model=lm)
    state = {}
    if audio_src:
        encoder = read_tensors(weight_files(audio_src, what=f"{WHAT} audio encoder"), what=WHAT,
                               prefix="model.encoder.")
        state = {f"audio_tower.{k}": v for k, v in encoder.items()}
    state.update({k: v for k, v in trained.items() if not (lm is not None and k.startswith("language_model."))})
    assign(model, state, what=WHAT, dtype=dtype, ignore_missing=("language_model.*",) if lm is not None else ())
    if lm is None:
        model.language_model.tie_weights()
    first = next(model.language_model.parameters()).device if device_map else torch.device(device)
    model.audio_tower.to(first)
    model.multi_modal_projector.to(first)
    if not device_map:
        model.to(device)
    gen = fetch(src, "generation_config.json", what=WHAT, required=False)
    if gen is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(Path(gen).parent))
    # an empty config stops AutoTokenizer from parsing config.json ("ultravox" is not a transformers model type)
    tok = AutoTokenizer.from_pretrained(tokenizer or src, config=PretrainedConfig())
    tok.padding_side = "left"
    fe_src = src if fetch(src, "preprocessor_config.json", what=WHAT, required=False) else audio_src
    fe = WhisperFeatureExtractor.from_pretrained(fe_src)
    proc = UltravoxProcessor(tok, fe, stack_factor=config.stack_factor,
                             audio_context_size=2 * config.audio_config.max_source_positions)
    return model.eval(), proc


def build_tiny_ultravox(out_dir: Path, *, seed: int = 0) -> tuple[dict[str, Path], UltravoxModel]:
    """Three directories in the release layout: ``whisper/`` and ``llama/`` base models and ``ultravox/`` holding
    config (naming the bases), tokenizer, feature extractor and the trained parts (encoder + projector); and the
    in-memory model they describe (what :func:`load_ultravox` must give back)."""
    from safetensors.torch import save_file

    out = {k: Path(out_dir) / k for k in ("whisper", "llama", "ultravox")}
    whisper, wproc = tiny_whisper(128, seed=seed)
    whisper.save_pretrained(out["whisper"])
    wproc.save_pretrained(out["whisper"])
    tok = byte_tokenizer(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|eot_id|>",
                         add_bos=True, chat_template=LLAMA3_CHAT_TEMPLATE)
    llama = tiny_llama(len(tok), seed=seed + 1, tie=True, bos=tok.bos_token_id, eos=tok.eos_token_id)
    llama.save_pretrained(out["llama"])
    tok.save_pretrained(out["llama"])
    config = UltravoxConfig(audio_config=whisper.config, text_config=llama.config, hidden_size=128, stack_factor=8,
                            projector_ln_mid=True)
    torch.manual_seed(seed + 2)
    model = UltravoxModel(config, language_model=llama)
    with torch.no_grad():  # a fine-tuned encoder, as v0.5 ships one
        for p in model.audio_tower.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = {k: v.contiguous() for k, v in model.state_dict().items()
               if k.startswith(("audio_tower.", "multi_modal_projector."))}
    out["ultravox"].mkdir(parents=True, exist_ok=True)
    save_file(trained, str(out["ultravox"] / "model.safetensors"), metadata={"format": "pt"})
    (out["ultravox"] / "config.json").write_text(json.dumps({
        "architectures": ["UltravoxModel"], "model_type": "ultravox", "audio_model_id": "tiny/whisper",
        "text_model_id": "tiny/llama", "hidden_size": 128, "stack_factor": 8, "norm_init": 0.4,
        "projector_act": "swiglu", "projector_ln_mid": True, "audio_latency_block_size": None,
        "pad_token_id": tok.pad_token_id, "vocab_size": len(tok)}, indent=2))
    tok.save_pretrained(out["ultravox"])
    wproc.feature_extractor.save_pretrained(out["ultravox"])
    llama.generation_config.save_pretrained(out["ultravox"])
    return out, model.eval()
