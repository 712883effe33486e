"""SALMONN (``tsinghua-ee/SALMONN`` 13B v1, ``tsinghua-ee/SALMONN-7B``): Whisper and BEATs encoders, a window-level
Q-Former and LoRA-wrapped Vicuna, written here on transformers parts (:mod:`.arch.salmonn`) with the release's names.

Sources: a release hub id (its ``.pth`` is fetched), a checkpoint ``.pth`` file, or a local folder holding the
``.pth`` and a ``config.json`` with the ``model:`` block of the release's ``decode_config.yaml`` (``ckpt``,
``whisper_path``, ``beats_path``, ``llama_path``; relative paths inside the folder). The options ``whisper``,
``beats`` (the BEATs ``.pt`` file; not on the hub) and ``llama`` override the parts; ``allow_pickle`` lets a
checkpoint that stores Python objects besides tensors load (it runs the file's pickle code: trusted files only).
``tiny`` is such a folder built by :func:`~.arch.salmonn_io.build_tiny_salmonn`. The release is a standalone
repository (no ``trust_remote_code``).

Sites: ``audio_encoder`` (Whisper; ``ln_speech`` after it), ``beats`` (BEATs, post-norm layers as released;
``ln_audio`` after it), the window Q-Former's output ``audio_encoder.qformer`` and its projection into the LM
``audio_encoder.projector`` (one position per 0.33 s window), and ``lm``. The prompt is the release's
``USER: <Speech><SpeechHere></Speech> {prompt}\\nASSISTANT:`` with one LM position per window at ``<SpeechHere>``.

Seed 001 (App. B.3) reads SALMONN's LM input split into its speech and its text part. LM spans: ``audio`` (the speech
windows), ``text`` (the item's own text where it has one, else the instruction) and ``item`` (the part that is the
item: its speech windows, or the text of a text item). A speech item that carries its text (a transcription) is fed
as the paper feeds SALMONN, speech then that text in one prompt, so ``audio`` and ``text`` of one row are the paper's
two parts; ``svcca:position=item`` compares speech items with text items on their own parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt, torch_dtype
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.arch.layout import lm_positions
from lalm_probe.plugins.models.arch.salmonn_io import FOLDER_CONFIG, PAD, build_tiny_salmonn, load_salmonn

# BEATs layers are post-norm (``layer_norm_first`` is false in the released BEATs_iter3+): each norm follows its
# residual add, so the norms are the post-norm components and the block output is the second one's.
BEATS_LAYER = {
    "out": Component("", width="mlp_post_norm"), "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_o": "self_attn.out_proj", "attn": Component("self_attn", width="attn_o"),
    "attn_post_norm": "self_attn_layer_norm", "mlp_up": "fc1", "mlp_act": Component("fc2", io="input"),
    "mlp_down": "fc2", "mlp": Component("fc2", width="mlp_down"), "mlp_post_norm": "final_layer_norm",
}
LM = "llama_model.base_model.model"


def build_tiny(out_dir: Path) -> None:
    """The arch's seeded tiny SALMONN as a local folder, ``config.json`` naming its parts."""
    paths, _ = build_tiny_salmonn(Path(out_dir))
    block = {"ckpt": paths["salmonn"].name, "whisper_path": paths["whisper"].name, "beats_path": paths["beats"].name,
             "llama_path": paths["vicuna"].name}
    (Path(out_dir) / FOLDER_CONFIG).write_text(json.dumps({"model": block}, indent=2))


class Salmonn(ModelPlugin):
    name = "salmonn"
    description = "SALMONN: Whisper + BEATs + window-level Q-Former + LoRA Vicuna (rebuilt from the release .pth)"
    default_checkpoint = "tsinghua-ee/SALMONN-7B"
    hub_ids = ("tsinghua-ee/SALMONN-7B", "tsinghua-ee/SALMONN")
    tiny = build_tiny
    lens_stack = "lm"
    audio_token = PAD  # the filler at the speech windows (used nowhere else in a row)
    option_defaults = {"whisper": None, "beats": None, "llama": None, "allow_pickle": False}
    option_help = {
        "whisper": "Whisper large-v2 weights (hub id or folder)",
        "beats": "the BEATs checkpoint file (not on the hub)",
        "llama": "the Vicuna weights (hub id or folder)",
        "allow_pickle": "true: load a release .pth that holds Python objects besides tensors (runs pickle)",
    }
    load_options = ("whisper", "beats", "llama", "allow_pickle")
    stacks = (
        # The Q-Former reads one window per batch row; its output and projection are read per clip, one position
        # per window (``windows``).
        Stack("audio_encoder", layers=("speech_encoder.layers",), components=bart_layer(),
              final_norm=("speech_encoder.layer_norm",),
              extras={"ln_speech": "ln_speech", "qformer": Component("speech_llama_proj", io="input",
                                                                     positions="windows"),
                      "projector": Component("speech_llama_proj", positions="windows")}),
        Stack("beats", layers=("beats.encoder.layers",), components=BEATS_LAYER, extras={"ln_audio": "ln_audio"}),
        Stack("lm", layers=(f"{LM}.model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=(f"{LM}.model.norm",), unembed=(f"{LM}.lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str, device_map: str | None,
                     whisper: str | None = None, beats: str | None = None, llama: str | None = None,
                     allow_pickle: bool = False) -> tuple[torch.nn.Module, Any]:
        return load_salmonn(source, whisper=whisper, beats=beats, llama=llama, dtype=torch_dtype(dtype),
                            device=device, device_map=device_map, allow_pickle=allow_pickle)

    def max_seconds(self) -> float:
        fe = self.processor.feature_extractor  # the release cuts the waveform to one Whisper window (30 s)
        return fe.n_samples / fe.sampling_rate

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        proc = self.processor
        texts, own = [], []
        for it, p in zip(items, prompts):
            body = "\n".join(t for t in (it.text, p.user) if t)  # an item's text first, then the instruction
            suffix = f" {p.assistant_prefix}" if p.assistant_prefix else ""
            texts.append(proc.render(body, audio=it.has_audio) + suffix)
            own.append(it.text or p.user)
        batch = proc(texts, list(audio), sampling_rate=self.sample_rate, user_texts=own)
        rows = []
        for it, row in zip(items, batch.rows):
            lm = lm_positions(row)
            item = row.audio if it.has_audio else row.text
            if item:
                lm.spans["item"] = item
            out = {"lm": lm}
            if row.clip is not None:
                out["audio_encoder"] = Positions(0, row.encoder_frames["speech_encoder"], row=row.clip)
                out["beats"] = Positions(0, row.encoder_frames["beats"], row=row.clip)
                out["windows"] = Positions(0, proc.num_windows, row=row.clip)
            rows.append(out)
        return Prepared(batch.inputs, rows)


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Salmonn]
