"""The Gemma 3n plugin on a tiny real ``Gemma3nForConditionalGeneration``: its prompt and audio spans against the real
``Gemma3nProcessor``, the AltUp main stream as ``out`` (read and edited), the softcapped lens, the soft-token
projector, loading and the CLI. (probe check in tests/core/test_check.py covers padding, hidden states, the lens on
the model's own readout and decode steps.)"""

from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit
from lalm_probe.plugins.models.gemma3n import Gemma3n

PROMPT = "What is said?"


@pytest.fixture(scope="module")
def gemma(probe_cache):
    return Session(Gemma3n.load("tiny"))


@pytest.fixture
def clips(tmp_path):
    """Two wav files of different lengths, as speech items with the same instruction."""
    items = []
    for name, seconds in (("long", 1.0), ("short", 0.45)):
        sf.write(tmp_path / f"{name}.wav", tone(220, seconds), SR)
        items.append(Stimulus(name, audio=str(tmp_path / f"{name}.wav"), prompt=PROMPT))
    return items


def layer_output(model: torch.nn.Module, layer: int, run) -> torch.Tensor:
    """The raw (4, batch, time, hidden) output of one decoder layer during ``run()``."""
    seen = {}
    hook = model.model.language_model.layers[layer].register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        result = run()
    finally:
        hook.remove()
    return seen["out"], result


def test_the_prompt_is_the_processors_chat_template_with_188_soft_tokens_per_clip(gemma, clips):
    processor, audio_id = gemma.plugin.processor, gemma.plugin.tokenizer.audio_token_id
    prepared = gemma.prepare([*clips, Stimulus("text", text="hello world", prompt="Repeat it.")])
    convs = [[{"role": "user", "content": [{"type": "audio", "path": it.audio}, {"type": "text", "text": PROMPT}]}]
             for it in clips] + [[{"role": "user", "content": [{"type": "text", "text": "hello world\nRepeat it."}]}]]
    assert processor.apply_chat_template(convs[0], add_generation_prompt=True, tokenize=False) == \
        f"<bos><start_of_turn>user\n<audio_soft_token>{PROMPT}<end_of_turn>\n<start_of_turn>model\n"
    for b, (conv, seconds) in enumerate(zip(convs, (1.0, 0.45, None))):
        ref = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        lm = prepared.rows[b]["lm"]
        ids = prepared.inputs["input_ids"][b, lm.offset:lm.offset + lm.length].tolist()
        assert ids == ref["input_ids"][0].tolist()  # one <bos>, the same tokens inside a left-padded batch
        assert gemma.plugin.tokenizer.decode(ids[slice(*lm.spans["text"])]) == conv[0]["content"][-1]["text"]
        if seconds is None:
            assert "audio" not in lm.spans and audio_id not in ids
            continue
        start, end = lm.spans["audio"]
        assert end - start == 188 and set(ids[start:end]) == {audio_id} and audio_id not in ids[:start] + ids[end:]
        assert processor.tokenizer.decode(ids[start - 3:start]) == "\n\n<start_of_audio>"
        # the clip alone: padded to 128 samples, 513-sample windows every 160; 4 frames per encoder position, 4
        # positions per soft token
        frames = (math.ceil(SR * seconds / 128) * 128 - 513) // 160 + 1
        assert frames == int(ref["input_features_mask"].sum())
        assert prepared.rows[b]["audio_encoder"].length == math.ceil(frames / 4)
        assert lm.spans["audio_valid"] == (start, start + math.ceil(frames / 16))


def test_out_reads_and_edits_the_main_altup_stream_only(gemma, clips):
    model = gemma.plugin.model
    stacked, plain = layer_output(model, 1, lambda: gemma.run(clips, ["lm.1.out"], ["all"]))
    prepared = gemma.prepare(clips)
    for b, row in enumerate(prepared.rows):
        lm = row["lm"]
        torch.testing.assert_close(plain["lm.1.out@all"][b], stacked[0, b, lm.offset:lm.offset + lm.length])
    vector = torch.randn(gemma.width("lm.1.out"), generator=torch.Generator().manual_seed(0))
    edited, _ = layer_output(model, 1, lambda: gemma.run(clips, ["lm.1.out"], edits=[
        Edit("lm.1.out", "add", positions="last", value=vector)]))
    torch.testing.assert_close(edited[0, :, -1] - stacked[0, :, -1], vector.expand(2, -1))  # left padded: last
    torch.testing.assert_close(edited[0, :, :-1], stacked[0, :, :-1])
    torch.testing.assert_close(edited[1:], stacked[1:])  # streams 1-3 pass through


def test_the_lens_is_the_final_norm_unembedding_and_softcap_and_reproduces_the_models_readout(gemma, clips):
    model, text = gemma.plugin.model, gemma.plugin.model.model.language_model
    seen = {}
    hook = text.norm.register_forward_pre_hook(lambda m, args: seen.update(merged=args[0]))
    try:
        prepared = gemma.prepare(clips[:1])
        with torch.no_grad():
            logits = model(**prepared.inputs).logits[0, -1]
    finally:
        hook.remove()
    h = gemma.run(clips[:1], ["lm.3.out"])["lm.3.out@last"]
    with torch.no_grad():
        by_hand = 30.0 * torch.tanh(model.lm_head(text.norm(h)) / 30.0)
    torch.testing.assert_close(gemma.lens(h), by_hand)
    torch.testing.assert_close(gemma.lens(seen["merged"][:, -1]), logits[None])  # what the model reads out
    assert gemma.lens(h * 1e4).abs().max() <= 30.0
    assert not torch.allclose(gemma.lens(h), logits[None], atol=1e-3)  # stream 0 alone is the main stream's view


def test_the_projector_gives_the_clips_soft_tokens_and_the_rest_of_188_is_one_padding_embedding(gemma, clips):
    seen = {}
    hook = gemma.plugin.model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        reads = gemma.run(clips, ["audio_encoder.projector", "audio_encoder.1.conv_dw"], ["all"])
    finally:
        hook.remove()
    prepared = gemma.prepare(clips)
    dw = gemma.plugin.model.model.audio_tower.conformer[1].lconv1d.depthwise_conv1d
    for b, row in enumerate(prepared.rows):
        at, (start, end), (_, valid) = row["lm"].offset, row["lm"].spans["audio"], row["lm"].spans["audio_valid"]
        projected = reads["audio_encoder.projector@all"][b]
        assert projected.shape == (row["audio_tokens"].length, gemma.width("lm.0.out"))
        torch.testing.assert_close(projected, seen["embeds"][b, at + start:at + valid])
        padding = seen["embeds"][b, at + valid:at + end]
        torch.testing.assert_close(padding, padding[:1].expand_as(padding))
        assert reads["audio_encoder.1.conv_dw@all"][b].shape == (row["audio_encoder"].length, dw.out_channels)


def test_the_tiny_instance_round_trips_without_a_vision_tower_and_a_bad_checkpoint_is_one_sentence(gemma, tmp_path):
    again = Gemma3n.load("tiny")  # the cached save_pretrained folder, through the plugin's own loading
    theirs = dict(again.model.named_parameters())
    assert not any("vision_tower" in name for name in theirs)
    for name, p in gemma.plugin.model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    with pytest.raises(UserError, match="Could not load gemma3n checkpoint"):
        Gemma3n.load(str(tmp_path))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_list_and_info_show_the_model_its_stacks_and_checkpoints(capsys):
    code, out = run_cli(capsys, "list")
    assert code == 0 and "gemma3n" in out
    code, out = run_cli(capsys, "info", "--model", "gemma3n", "--checkpoint", "tiny", "--json")
    about = json.loads(out)
    assert code == 0 and "google/gemma-3n-E4B-it" in about["checkpoints"] and "AltUp" in about["lens_caveat"]
    assert about["stacks"]["lm"]["components"]["out"] == 64


@pytest.mark.parametrize("analysis", ["logitlens:attribute=gender", "clusters:labels=[gender],space=full"])
def test_probe_run_on_a_manifest_of_wav_files(capsys, tmp_path, gender_manifest, analysis):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "run", "--model", "gemma3n", "--checkpoint", "tiny", "--analysis", analysis,
                         "--data", str(gender_manifest), "--out", str(out), "--batch-size", "6")
    assert code == 0, text
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert json.loads((out / "results.json").read_text())["summary"]
