"""The Audio Flamingo 3 plugin on the tiny real architecture (1 s windows, so a 1.3 s clip takes two): prompts and
audio spans against the real processor's own chat template output, clips read across windows, and the CLI. Padding,
hidden states, the lens and decode steps are covered by ``probe check`` (tests/core/test_check.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.model import Prompt
from lalm_probe.plugins.models.audioflamingo3 import AudioFlamingo3


@pytest.fixture(scope="module")
def session(probe_cache):
    return Session(AudioFlamingo3.load("tiny"))


def clips():
    return [Stimulus("long", audio=tone(440, 1.3), sample_rate=SR, prompt="What is this?"),
            Stimulus("short", audio=tone(220, 0.5), sample_rate=SR, prompt="Describe the sound in detail, please."),
            Stimulus("exact", audio=tone(330, 1.0), sample_rate=SR, prompt="Which instrument?")]


def conversation(item: Stimulus) -> list[dict]:
    content = [{"type": "text", "text": item.prompt}, {"type": "audio", "audio": item.audio}]
    return [{"role": "user", "content": content}]


def test_the_prompt_is_the_processors_chat_template_output_and_the_audio_span_its_sound_tokens(session):
    plugin, items = session.plugin, clips()
    ref = plugin.processor.apply_chat_template([conversation(it) for it in items], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)
    prepared = session.prepare(items)
    assert set(prepared.inputs) == set(ref) | {"position_ids"}  # counted over valid positions (padding)
    for key, value in ref.items():
        assert torch.equal(prepared.inputs[key], value), key
    sound = plugin.tokenizer.convert_tokens_to_ids("<sound>")
    for b, row in enumerate(prepared.rows):
        lm = row["lm"]
        s, e = lm.spans["audio"]
        assert list(range(lm.offset + s, lm.offset + e)) == (ref["input_ids"][b] == sound).nonzero().flatten().tolist()
    # 25 <sound> tokens per second of audio, whatever the windows
    assert [r["lm"].spans["audio"][1] - r["lm"].spans["audio"][0] for r in prepared.rows] == [32, 12, 25]
    rendered = plugin.render(items[0], Prompt(items[0].prompt, "It is"))
    assert rendered.endswith("<|im_start|>assistant\nIt is") and "<|im_start|>user\n<sound>What is this?" in rendered


def test_a_clip_is_read_across_its_windows_as_one_span(session):
    plugin, items = session.plugin, clips()
    seen = {}
    hook = plugin.model.model.audio_tower.layers[1].register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("layer", out))
    try:
        reads = session.run(items, ["audio_encoder.1.out", "audio_encoder.projector"], ["mean", "all"])
    finally:
        hook.remove()
    prepared = session.prepare(items)
    mask = prepared.inputs["input_features_mask"]
    assert mask.shape[0] == 4 and int(mask[3].sum()) == 100  # windows 2 + 1 + 1: the 1.0 s clip fills its one
    windows = [[0, 1], [2], [3]]
    for b, mine in enumerate(windows):
        frames = torch.cat([seen["layer"][w, :(int(mask[w].sum()) - 1) // 2 + 1] for w in mine])
        torch.testing.assert_close(reads["audio_encoder.1.out@all"][b], frames)
        torch.testing.assert_close(reads["audio_encoder.1.out@mean"][b], frames.mean(0))
    # the projector rows, clip after clip, are the audio embeddings the LM receives in its <sound> positions
    with torch.no_grad():
        embeds = plugin.model.model.get_audio_features(prepared.inputs["input_features"],
                                                       prepared.inputs["input_features_mask"]).pooler_output
    torch.testing.assert_close(torch.cat(reads["audio_encoder.projector@all"]), embeds)


def test_the_cli_runs_the_logit_lens_and_clusters_on_the_audio_encoder(capsys, tmp_path, gender_manifest):
    for analysis in ("logitlens:attribute=gender", "clusters:stack=audio_encoder,labels=[gender],space=both"):
        out = tmp_path / analysis.split(":")[0]
        code = main(["run", "--model", "audioflamingo3", "--checkpoint", "tiny", "--analysis", analysis,
                     "--data", str(gender_manifest), "--out", str(out), "--batch-size", "5"])
        text = capsys.readouterr()
        assert code == 0, text.out + text.err
        assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert main(["info", "--model", "audioflamingo3", "--checkpoint", "tiny"]) == 0
    assert "nvidia/audio-flamingo-3-hf" in capsys.readouterr().out


def test_clips_past_the_processors_cap_are_refused_not_cut(session):
    """The processor keeps the first max_audio_len seconds of a clip (10 min); the plugin says so, so a longer clip
    is refused before collection instead of being read cut."""
    fe = session.plugin.processor.feature_extractor
    assert session.plugin.max_seconds() == session.plugin.processor.max_audio_len == 600
    assert session.plugin.max_seconds() % fe.chunk_length == 0
