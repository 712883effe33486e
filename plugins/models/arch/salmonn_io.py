"""SALMONN inputs and loading: the release's prompt wrapping, assembly from four sources, a tiny twin.

Prompt (``bytedance/SALMONN`` ``cli_inference.py`` + ``models/salmonn.py`` ``prompt_wrap``/``generate``): the user's
prompt becomes ``"USER: <Speech><SpeechHere></Speech> {prompt}\\nASSISTANT:"`` (``prompt_template`` of
``configs/decode_config.yaml``); it is split at ``<SpeechHere>``, both halves are tokenized without special tokens,
and the LM reads ``[BOS] before [speech windows] after``. Audio (``utils.prepare_one_sample``) is padded to at least
1 s and cut to at most one Whisper window; Whisper gets the window-padded log-mel, BEATs the raw wave.

Loading: the release checkpoint (``salmonn_v1.pth``, ``salmonn_7b_v0.pth``) holds ``{"model": ...}`` with the
trained parts and the model's buffers; Whisper, BEATs and Vicuna come from their own files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.errors import UserError

from .layout import Batch, RowSpans, left_pad, positions_from_mask, token_span, whisper_frames
from .salmonn import SalmonnConfig, SalmonnModel
from .salmonn_beats import beats_tokens
from .sources import assign, fetch, is_local, read_json, read_tensors, torch_load, weight_files
from .tiny import byte_tokenizer, tiny_llama, tiny_whisper

WHAT = "SALMONN"
SPEECH = "<SpeechHere>"
PROMPT_TEMPLATE = "USER: {}\nASSISTANT:"
PAD = "[PAD]"
RELEASE_FILES = {"tsinghua-ee/SALMONN": "salmonn_v1.pth", "tsinghua-ee/SALMONN-7B": "salmonn_7b_v0.pth"}
VICUNA = {4096: "lmsys/vicuna-7b-v1.5", 5120: "lmsys/vicuna-13b-v1.1"}  # by LM width, from the READMEs


class SalmonnProcessor:
    """Prompts + audio -> left-padded batch; each audio row's speech span holds one token per window."""

    def __init__(self, tokenizer: Any, feature_extractor: Any, *, num_windows: int,
                 prompt_template: str = PROMPT_TEMPLATE) -> None:
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.num_windows, self.prompt_template = num_windows, prompt_template
        self.filler_id = tokenizer.convert_tokens_to_ids(PAD)

    def render(self, prompt: str | None, *, audio: bool) -> str:
        """``prompt_template.format("<Speech><SpeechHere></Speech> " + prompt.strip())``; without audio, the bare
        prompt in the same template (the release has no text-only mode)."""
        body = (prompt or "").strip()
        return self.prompt_template.format(f"<Speech>{SPEECH}</Speech> {body}" if audio else body)

    def wave(self, audio: np.ndarray) -> np.ndarray:
        """``prepare_one_sample``: pad to at least 1 s, cut to one Whisper window."""
        sr = self.feature_extractor.sampling_rate
        audio = np.asarray(audio, dtype=np.float32)
        if len(audio) < sr:
            audio = np.concatenate([audio, np.zeros(sr - len(audio), dtype=np.float32)])
        return audio[: self.feature_extractor.n_samples]

    def __call__(self, texts: Sequence[str], audios: Sequence[np.ndarray | None], *, sampling_rate: int = 16000,
                 user_texts: Sequence[str | None] | None = None) -> Batch:
        """Build a batch from rendered prompts (see :meth:`render`) and clips (``None`` for a text-only row)."""
        bos = self.tokenizer.bos_token_id
        rows_ids, layouts, waves = [], [], []
        for b, (text, audio) in enumerate(zip(texts, audios)):
            parts = text.split(SPEECH)
            if (audio is None) != (len(parts) == 1) or len(parts) > 2:
                raise UserError(f"{WHAT}: row {b} needs exactly one '{SPEECH}' when it has audio, none without.")
            ids, offsets, char0, speech = [bos], [(-1, -1)], 0, None
            for i, part in enumerate(parts):
                enc = self.tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                offsets += [(a + char0, e + char0) for a, e in enc["offset_mapping"]]
                char0 += len(part) + len(SPEECH)
                if i == 0 and audio is not None:
                    speech = (len(ids), len(ids) + self.num_windows)
                    ids += [self.filler_id] * self.num_windows
                    offsets += [(-1, -1)] * self.num_windows
                    waves.append(self.wave(audio))
            user = user_texts[b] if user_texts else None
            at = text.rfind(user.strip()) if user else -1
            text_span = token_span(offsets, at, at + len(user.strip())) if user and at >= 0 else None
            rows_ids.append(ids)
            layouts.append((speech, text_span))
        input_ids, mask = left_pad(rows_ids, self.filler_id)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                  "position_ids": positions_from_mask(mask)}
        fe = self.feature_extractor
        lengths = iter([len(w) for w in waves])
        rows, clip, starts = [], 0, []
        for ids, (speech, text_span) in zip(rows_ids, layouts):
            offset = input_ids.shape[1] - len(ids)
            if speech:
                starts.append(offset + speech[0])
            frames = {}
            if speech:
                n = next(lengths)
                frames = {"speech_encoder": whisper_frames(n, fe.hop_length, fe.nb_max_frames),
                          "beats": beats_tokens(n)}
            rows.append(RowSpans(offset, len(ids), speech, text_span, frames.get("speech_encoder"),
                                 clip if speech else None, encoder_frames=frames))
            clip += int(speech is not None)
        if waves:
            lens = torch.tensor([len(w) for w in waves])
            raw = torch.zeros(len(waves), int(lens.max()))
            for i, w in enumerate(waves):
                raw[i, : len(w)] = torch.from_numpy(w)
            feats = self.feature_extractor(waves, sampling_rate=sampling_rate, return_tensors="pt").input_features
            inputs.update(input_features=feats, raw_wav=raw, raw_wav_lens=lens,
                          audio_token_start_idx=torch.tensor(starts),
                          audio_token_len=torch.full((len(waves),), self.num_windows),
                          audio_batch_size=torch.tensor([int(s is not None) for s, _ in layouts]))
        return Batch(inputs, rows)


def add_pad(tokenizer: Any, lm: torch.nn.Module) -> None:
    """The release's tokenizer set-up: add ``[PAD]`` and resize the LM (Vicuna: 32000 -> 32001 rows). The release's
    new row is random and never saved; the mean of the other rows is a reproducible stand-in."""
    tokenizer.add_special_tokens({"pad_token": PAD})
    old = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (lm.get_input_embeddings(), lm.get_output_embeddings())}.values():
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)


def _qformer_dims(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The Q-Former's size as the checkpoint's shapes give it (bert-base in the releases; heads of width 64)."""
    hidden = state["speech_query_tokens"].shape[-1]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"speech_Qformer\.bert\.encoder\.layer\.(\d+)\.", k))}
    inter = state["speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    return {"num_hidden_layers": len(layers), "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
            "intermediate_size": inter}


def _checkpoint(ckpt: str, filename: str | None, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if is_local(ckpt) and Path(ckpt).is_file():
        path = Path(ckpt)
    else:
        name = filename or RELEASE_FILES.get(ckpt)
        if name is None:
            raise UserError(f"{WHAT}: '{ckpt}' is neither a checkpoint file nor a known release "
                            f"({', '.join(RELEASE_FILES)}); pass the .pth file or filename=.")
        path = fetch(ckpt, name, what=WHAT)
    obj = torch_load(path, what=WHAT, allow_pickle=allow_pickle)
    if not isinstance(obj, dict) or "model" not in obj:
        raise UserError(f"{WHAT}: '{path}' is not a SALMONN checkpoint (expected a dict with 'model').")
    return obj["model"]


FOLDER_CONFIG = "config.json"
PART_KEYS = {"whisper": "whisper_path", "beats": "beats_path", "llama": "llama_path"}


def local_release(folder: Path) -> tuple[str, dict[str, str]]:
    """A local SALMONN folder: the checkpoint file and the parts its ``config.json`` names.

    ``config.json`` holds the ``model:`` block of the release's ``configs/decode_config.yaml`` (``ckpt``,
    ``whisper_path``, ``beats_path``, ``llama_path``; relative paths are inside the folder). Without it the folder
    must hold exactly one checkpoint ``.pth``, and the parts come from the options or their defaults.
    """
    config = folder / FOLDER_CONFIG
    if config.is_file():
        block = read_json(folder, FOLDER_CONFIG, what=WHAT)
        block = block.get("model", block)
        paths = {}
        for key, field in {**PART_KEYS, "ckpt": "ckpt"}.items():
            if block.get(field):  # a path inside the folder, else as written (an absolute path or a hub id)
                paths[key] = str(folder / block[field]) if (folder / block[field]).exists() else block[field]
        if "ckpt" not in paths:
            raise UserError(f"{WHAT}: '{config}' names no 'ckpt' (the release checkpoint .pth).")
        return paths.pop("ckpt"), paths
    found = sorted(folder.glob("*.pth"))
    if len(found) != 1:
        raise UserError(f"{WHAT}: '{folder}' should hold one checkpoint .pth (or a config.json naming it and the "
                        f"parts), found {len(found)}.")
    return str(found[0]), {}


def load_salmonn(ckpt: str | Path, *, whisper: str | None = None, beats: str | Path | None = None,
                 llama: str | None = None, filename: str | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", device_map: str | dict | None = None,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.1,
                 allow_pickle: bool = False) -> tuple[SalmonnModel, SalmonnProcessor]:
    """Assemble SALMONN from its checkpoint (a ``.pth`` file, a release hub id or a local folder, see
    :func:`local_release`) and its base models.

    ``whisper`` defaults to ``openai/whisper-large-v2``; ``beats`` is the BEATs ``.pt`` file
    (``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt``, not on the hub); ``llama`` defaults to the Vicuna of
    the release's README matching the checkpoint's LM width. LoRA rank and targets are read from the checkpoint;
    ``lora_alpha`` (32 in every released config) cannot be.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor

    if Path(str(ckpt)).is_dir():
        ckpt, parts = local_release(Path(str(ckpt)))
        whisper, beats = whisper or parts.get("whisper"), beats or parts.get("beats")
        llama = llama or parts.get("llama")
    whisper = whisper or "openai/whisper-large-v2"
    state = _checkpoint(str(ckpt), filename, allow_pickle)
    lora = {k: v for k, v in state.items() if ".lora_A." in k}
    if not lora:
        raise UserError(f"{WHAT}: the checkpoint has no LoRA weights; it is not a released SALMONN.")
    rank, width = next(iter(lora.values())).shape
    targets = sorted({re.search(r"\.(\w+)\.lora_A\.", k).group(1) for k in lora})
    llama = llama or VICUNA.get(width)
    if llama is None:
        raise UserError(f"{WHAT}: no Vicuna of width {width} is known; pass llama=<dir or hub id>.")
    has_beats = any(k.startswith("ln_audio.") for k in state)
    beats_obj = None
    if has_beats:
        if beats is None:
            raise UserError(f"{WHAT}: this checkpoint uses BEATs; download BEATs_iter3_plus_AS2M_finetuned_on_"
                            "AS2M_cpt2.pt (linked from the SALMONN README) and pass beats=<file>.")
        if not (is_local(beats) and Path(beats).is_file()):
            raise UserError(f"{WHAT}: BEATs '{beats}' is not a file; BEATs is not on the hub, pass the local .pt.")
        beats_obj = torch_load(Path(beats), what=f"{WHAT} BEATs", allow_pickle=allow_pickle)
    whisper_cfg = read_json(whisper, "config.json", what=f"{WHAT} Whisper")
    encoder = read_tensors(weight_files(whisper, what=f"{WHAT} Whisper"), what=WHAT, prefix="model.encoder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llama)
        lm = AutoModelForCausalLM.from_pretrained(llama, dtype=dtype, **({"device_map": device_map}
                                                                         if device_map else {}))
    except (OSError, ValueError) as exc:
        raise UserError(f"{WHAT}: could not load Vicuna '{llama}' ({str(exc).splitlines()[0][:120]}). Download it "
                        f"(`hf download {llama}`) and pass llama=<local dir>.") from None
    add_pad(tokenizer, lm)
    config = SalmonnConfig(whisper_config=whisper_cfg, llama_config=lm.config,
                           beats_config=beats_obj["cfg"] if beats_obj else None, lora_rank=rank,
                           lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=targets,
                           num_speech_query_token=state["speech_query_tokens"].shape[1], qformer=_qformer_dims(state))
    with torch.device("meta"):
        model = SalmonnModel(config, llama=lm)
    parts = {f"speech_encoder.{k}": v for k, v in encoder.items()}
    if beats_obj:
        parts.update({f"beats.{k}": v for k, v in beats_obj["model"].items()})
    parts.update(state)
    assign(model, parts, what=WHAT, dtype=dtype, ignore_missing=("llama_model.*",),
           ignore_unexpected=("*.rotary_emb.inv_freq",))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UserError(f"{WHAT}: {len(left)} LoRA weights are missing from the checkpoint (first: {left[:2]}).")
    first = next(lm.parameters()).device if device_map else torch.device(device)
    for name, child in model.named_children():
        if name != "llama_model":
            child.to(first)
    model.speech_query_tokens.data = model.speech_query_tokens.data.to(first)
    if not device_map:
        model.to(device)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_token_id, 2, tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    fe = WhisperFeatureExtractor.from_pretrained(whisper)
    proc = SalmonnProcessor(tokenizer, fe, num_windows=config.num_windows(config.whisper_config.max_source_positions))
    return model.eval(), proc


TINY_BEATS = {"input_patch_size": 16, "embed_dim": 32, "conv_bias": False, "encoder_layers": 2,
              "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4,
              "activation_fn": "gelu", "layer_norm_first": False, "deep_norm": True, "conv_pos": 16,
              "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32, "max_distance": 64,
              "gru_rel_pos": True, "finetuned_model": True, "predictor_class": 5}


def build_tiny_salmonn(out_dir: Path, *, seed: int = 0) -> tuple[dict[str, Path], SalmonnModel]:
    """``whisper/``, ``beats.pt``, ``vicuna/`` and ``salmonn.pth`` (trained parts + buffers, as released), and the
    in-memory model they describe (what :func:`load_salmonn` must give back)."""
    import copy

    out = {"whisper": Path(out_dir) / "whisper", "vicuna": Path(out_dir) / "vicuna",
           "beats": Path(out_dir) / "beats.pt", "salmonn": Path(out_dir) / "salmonn.pth"}
    whisper, wproc = tiny_whisper(80, seed=seed)
    whisper.save_pretrained(out["whisper"])
    wproc.save_pretrained(out["whisper"])
    tok = byte_tokenizer(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", add_bos=True)
    vicuna = tiny_llama(len(tok), seed=seed + 1, bos=tok.bos_token_id, eos=tok.eos_token_id)
    vicuna.save_pretrained(out["vicuna"])
    tok.save_pretrained(out["vicuna"])
    lm = copy.deepcopy(vicuna)
    add_pad(copy.deepcopy(tok), lm)
    config = SalmonnConfig(whisper_config=whisper.config, llama_config=lm.config, beats_config=TINY_BEATS,
                           qformer={"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128})
    torch.manual_seed(seed + 2)
    model = SalmonnModel(config, llama=lm).eval()
    model.speech_encoder.load_state_dict(whisper.model.encoder.state_dict())
    torch.save({"cfg": TINY_BEATS, "model": model.beats.state_dict()}, out["beats"])
    grads = {n for n, _ in model.named_parameters()
             if not n.startswith(("speech_encoder.", "beats.", "llama_model.")) or ".lora_" in n}
    trained = {k: v for k, v in model.state_dict().items() if k in grads or k.endswith("position_ids")}
    for i in range(lm.config.num_hidden_layers):  # the 4.28-era persistent rotary buffers the release saved
        trained[f"llama_model.base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save({"model": trained}, out["salmonn"])
    return out, model
