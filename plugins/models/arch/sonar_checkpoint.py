"""Reading SONAR's released fairseq2 ``.pt`` checkpoints without fairseq2 (its wheels pin other torch versions).

What fairseq2 0.4's ``AbstractModelHandler.load`` does, then SONAR's handlers (``sonar/models/sonar_text/handler.py``,
``sonar/models/sonar_speech/handler.py``): ``torch.load`` on CPU, take ``checkpoint[checkpoint.get("model_key",
"model")]``, drop a DDP ``module.`` prefix; a checkpoint still in fairseq (v1) naming is renamed with the release's own
key tables (repeated below as data). ``weights_only=True`` refuses pickled objects other than tensors; a file that needs
them can be read with ``trust_pickle=True`` (it runs the file's pickle code: only for files you trust).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lalm_probe.core.errors import UserError

BASE_URL = "https://dl.fbaipublicfiles.com/SONAR/"
TEXT_CARD = "text_sonar_basic_encoder"
TEXT_FILES = {"checkpoint": "sonar_text_encoder.pt", "tokenizer": "sentencepiece.source.256000.model"}
# sonar/cards/sonar_speech_encoder.yaml: the English encoder is arch "english", the others "non_english".
SPEECH_V3AP = "arb cat cym dan deu est fin fra ind ita kor nld pes por ron spa swh tgl tur uzn".split()
SPEECH_V5AP = ("asm bel ben bos bul ces cmn guj heb hin hrv jpn kan lao lit lvs mal mar mkd mlt npi ory pan pol rus "
               "slk slv snd srp tam tel tha ukr urd vie yue").split()


def speech_checkpoint_file(lang: str) -> str:
    """File name of ``sonar_speech_encoder_<lang>`` on dl.fbaipublicfiles.com (from the speech cards)."""
    if lang == "eng":
        return "spenc.eng.pt"
    for version, langs in (("v3ap", SPEECH_V3AP), ("v5ap", SPEECH_V5AP)):
        if lang in langs:
            return f"spenc.{version}.{lang}.pt"
    raise UserError(f"No SONAR speech encoder for '{lang}'. Available: eng, {', '.join(SPEECH_V3AP + SPEECH_V5AP)}.")


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model tensors of a fairseq2 (or fairseq) checkpoint file, ``module.`` prefix removed."""
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise UserError(f"'{path}' holds pickled objects besides tensors ({str(exc).splitlines()[0][:100]}); "
                        f"load it with trust_pickle=True only if you trust the file.") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"Cannot read the checkpoint '{path}' ({str(exc).splitlines()[0][:120]}).") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"'{path}' is not a fairseq2 checkpoint (a dict of tensors).")
    state = checkpoint
    for key in (checkpoint.get("model_key", "model"), "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``convert_model_state_dict``: the first pattern that changes a key renames it; fairseq leftovers dropped."""
    out = {}
    for key, value in state.items():
        for pattern, repl in table:
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    for junk in ("encoder.version", "decoder.version", "version", "encoder.embed_positions._float_tensor",
                 "decoder.embed_positions._float_tensor", "embed_positions._float_tensor"):
        out.pop(junk, None)
    return out


_TEXT_TABLE = [(rf"^layers\.([0-9]+)\.{a}", rf"encoder.layers.\1.{b}") for a, b in (
    (r"self_attn\.q_proj\.", "self_attn.q_proj."), (r"self_attn\.k_proj\.", "self_attn.k_proj."),
    (r"self_attn\.v_proj\.", "self_attn.v_proj."), (r"self_attn\.out_proj\.", "self_attn.output_proj."),
    (r"self_attn_layer_norm\.", "self_attn_layer_norm."), (r"fc1\.", "ffn.inner_proj."),
    (r"fc2\.", "ffn.output_proj."), (r"final_layer_norm\.", "ffn_layer_norm."))] + [
    (r"^embed_tokens\.", "encoder_frontend.embed.")]


def convert_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``convert_sonar_text_encoder_checkpoint``: fairseq2 keys pass; fairseq keys are renamed and the first four
    embedding rows reordered from fairseq's (BOS, PAD, EOS, UNK) to the SentencePiece order (PAD, UNK, BOS, EOS)."""
    if "encoder_frontend.embed.weight" in state:
        return state
    out = _rename(state, _TEXT_TABLE)
    embed = out["encoder_frontend.embed.weight"].clone()
    embed[[0, 1, 2, 3]] = embed[[1, 3, 0, 2]]
    out["encoder_frontend.embed.weight"] = embed
    return out


_W2V = r"^encoder\.w2v_model\.encoder\.layers\.([0-9]+)\."
_POOL = r"^decoder\.layers\.([0-9]+)\."
_SPEECH_TABLE = [
    (r"^encoder\.w2v_model\.layer_norm\.", "encoder_frontend.post_extract_layer_norm."),
    (r"^encoder\.w2v_model\.post_extract_proj\.", "encoder_frontend.model_dim_proj."),
    (_W2V + r"conv_module\.batch_norm\.", r"encoder.layers.\1.conv.batch_norm."),
    (_W2V + r"conv_module\.depthwise_conv\.", r"encoder.layers.\1.conv.depthwise_conv."),
    (_W2V + r"conv_module\.layer_norm\.", r"encoder.layers.\1.conv_layer_norm."),
    (_W2V + r"conv_module\.pointwise_conv1\.", r"encoder.layers.\1.conv.pointwise_conv1."),
    (_W2V + r"conv_module\.pointwise_conv2\.", r"encoder.layers.\1.conv.pointwise_conv2."),
    (_W2V + r"ffn(1|2)\.layer_norm\.", r"encoder.layers.\1.ffn\2_layer_norm."),
    (_W2V + r"ffn(1|2)\.w_1\.", r"encoder.layers.\1.ffn\2.inner_proj."),
    (_W2V + r"ffn(1|2)\.w_2\.", r"encoder.layers.\1.ffn\2.output_proj."),
    (_W2V + r"self_attn_layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (_W2V + r"self_attn\.linear_q\.", r"encoder.layers.\1.self_attn.q_proj."),
    (_W2V + r"self_attn\.linear_k\.", r"encoder.layers.\1.self_attn.k_proj."),
    (_W2V + r"self_attn\.linear_v\.", r"encoder.layers.\1.self_attn.v_proj."),
    (_W2V + r"self_attn\.linear_out\.", r"encoder.layers.\1.self_attn.output_proj."),
    (_W2V + r"self_attn\.linear_pos\.", r"encoder.layers.\1.self_attn.sdpa.r_proj."),
    (_W2V + r"self_attn\.pos_bias_u", r"encoder.layers.\1.self_attn.sdpa.u_bias"),
    (_W2V + r"self_attn\.pos_bias_v", r"encoder.layers.\1.self_attn.sdpa.v_bias"),
    (_W2V + r"final_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    # w2v-BERT's redundant final LayerNorm of a Conformer encoder moves to the SONAR model (the release's note)
    (r"^encoder\.w2v_model\.encoder\.layer_norm\.", "layer_norm."),
    (r"^decoder\.embed_tokens\.", "encoder_pooler.decoder_frontend.embed."),
    (_POOL + r"self_attn_layer_norm\.", r"encoder_pooler.decoder.layers.\1.self_attn_layer_norm."),
    (_POOL + r"self_attn\.out_proj\.", r"encoder_pooler.decoder.layers.\1.self_attn.output_proj."),
    (_POOL + r"self_attn\.", r"encoder_pooler.decoder.layers.\1.self_attn."),
    (_POOL + r"encoder_attn_layer_norm\.", r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn_layer_norm."),
    (_POOL + r"encoder_attn\.out_proj\.", r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn.output_proj."),
    (_POOL + r"encoder_attn\.", r"encoder_pooler.decoder.layers.\1.encoder_decoder_attn."),
    (_POOL + r"fc1\.", r"encoder_pooler.decoder.layers.\1.ffn.inner_proj."),
    (_POOL + r"fc2\.", r"encoder_pooler.decoder.layers.\1.ffn.output_proj."),
    (_POOL + r"final_layer_norm\.", r"encoder_pooler.decoder.layers.\1.ffn_layer_norm."),
    (r"^decoder\.embed_out", "encoder_pooler.projection_out.weight"),
]


def convert_speech_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``convert_sonar_speech_checkpoint``: fairseq2 keys pass; fairseq keys are renamed, unused ones dropped."""
    if "encoder_frontend.model_dim_proj.weight" in state:
        return state
    drop = ("encoder.w2v_model.mask_emb", "encoder.w2v_model.encoder.pos_conv.0.bias",
            "encoder.w2v_model.encoder.pos_conv.0.weight_g", "encoder.w2v_model.encoder.pos_conv.0.weight_v")
    return _rename({k: v for k, v in state.items() if k not in drop}, _SPEECH_TABLE)


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load; a mismatch is one sentence naming the first missing and unexpected keys."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"'{where}' does not match this SONAR architecture: {len(missing)} missing keys "
                        f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}.")
    model.load_state_dict(state, strict=True, assign=True)
