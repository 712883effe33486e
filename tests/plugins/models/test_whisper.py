"""The Whisper plugin on the tiny real architecture: prompts, language control, decode steps, padding, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit
from lalm_probe.plugins.models.whisper import Whisper


@pytest.fixture(scope="module")
def whisper(probe_cache):
    return Session(Whisper.load("tiny"))


@pytest.fixture
def forced(whisper):
    whisper.plugin.configure(language="label:language", task="transcribe")
    yield whisper
    whisper.plugin.configure(language=None)


def clips(n: int = 3) -> list[Stimulus]:
    langs = ["de", "fr", "en"]
    return [Stimulus(f"w{i}", audio=tone(180 + 70 * i, 0.4 + 0.5 * i), sample_rate=SR,
                     labels={"language": langs[i % 3], "text": "hello there friend"}) for i in range(n)]


def test_tiny_loads_through_from_pretrained_and_lists_sites(whisper):
    info = whisper.plugin.describe()
    assert info["encoder"]["runs"] == "once" and info["decoder"]["runs"] == "per_step"
    assert {"cross_q", "cross_o", "attn_k", "mlp_up", "mlp_act", "mlp_norm"} <= set(info["decoder"]["components"])
    assert info["cross_kv"]["components"] == {"cross_k": 64, "cross_v": 64} and info["cross_kv"]["runs"] == "once"
    again = Whisper.load("tiny")
    for p1, p2 in zip(whisper.plugin.model.parameters(), again.model.parameters()):
        assert torch.equal(p1, p2)
    assert again.model.generation_config.lang_to_id["<|de|>"] > 0  # custom keys survive save/load


def test_decoder_prompt_follows_the_language_option(whisper, forced):
    plugin = whisper.plugin
    gen = plugin.model.generation_config
    prepared = forced.prepare(clips())
    assert prepared.inputs["decoder_input_ids"][0].tolist() == [
        gen.decoder_start_token_id, gen.lang_to_id["<|de|>"], gen.task_to_id["transcribe"], gen.no_timestamps_token_id]
    assert prepared.inputs["decoder_input_ids"][1, 1] == gen.lang_to_id["<|fr|>"]
    plugin.configure(language=None)
    assert whisper.prepare(clips()).inputs["decoder_input_ids"].tolist() == [[gen.decoder_start_token_id]] * 3
    plugin.configure(language="xx")
    with pytest.raises(UserError, match="no language 'xx'"):
        whisper.prepare(clips())
    plugin.configure(language=None)
    with pytest.raises(UserError, match="unknown option"):
        plugin.configure(lang="de")
    assert not plugin.accepts(Stimulus("t", text="hello"))
    with pytest.raises(UserError, match="split longer recordings"):
        whisper.prepare([Stimulus("long", audio=tone(200, 6.0), sample_rate=SR)])  # the tiny window is 5 s


def test_padding_does_not_change_an_item(whisper):
    alone = whisper.run(clips()[:1], ["encoder.*.out", "decoder.*.out"], ["mean", "last"])
    batched = whisper.run(clips(), ["encoder.*.out", "decoder.*.out"], ["mean", "last"])
    for key, value in alone.items():
        torch.testing.assert_close(batched[key][:1], value, atol=1e-5, rtol=1e-4)
    lengths = [r["encoder"].length for r in whisper.prepare(clips()).rows]
    assert lengths == [20, 45, 70]  # 20 ms per encoder position


def _decoder_forward(session, items, decoder_ids):
    feats = session.prepare(items).inputs["input_features"]
    with torch.no_grad():
        return session.plugin.model(input_features=feats, decoder_input_ids=decoder_ids,
                                    output_hidden_states=True).decoder_hidden_states


def test_step_reads_match_forced_prefix_forward_passes(forced):
    items = clips()
    positions = ["step:1", "step:2", "step:4", "prefix:4"]
    gen = forced.generate(items, 4, ["decoder.0.out", "encoder.1.out"], positions[:1] + ["mean"] + positions[1:])
    prompt = forced.prepare(items).inputs["decoder_input_ids"]
    assert torch.equal(gen.sequences[:, :4], prompt)  # Whisper returns its prompt in front of the new tokens
    for t in (1, 2, 4):
        hs = _decoder_forward(forced, items, gen.sequences[:, : 4 + t - 1])
        # hidden_states[1] is the first layer's output (the last entry would be after the final norm)
        torch.testing.assert_close(gen.reads[f"decoder.0.out@step:{t}"], hs[1][:, -1], atol=1e-5, rtol=1e-4)
    hs = _decoder_forward(forced, items, gen.sequences[:, :7])
    torch.testing.assert_close(gen.reads["decoder.0.out@prefix:4"], hs[1].mean(1), atol=1e-5, rtol=1e-4)
    # the encoder is read once, from the same pass the decoder attends to
    enc = forced.run(items, ["encoder.1.out"], ["mean"])["encoder.1.out@mean"]
    torch.testing.assert_close(gen.reads["encoder.1.out@mean"], enc, atol=1e-5, rtol=1e-4)


def test_forced_target_equals_teacher_forcing(forced):
    items = clips(2)
    gen = forced.generate(items, 5, ["decoder.0.out"], ["step:5"], force_target="text")
    target = torch.tensor(forced.plugin.target_ids("hello there friend"))
    assert torch.equal(gen.sequences[0, 4:9], target[:5])
    prefix = torch.cat([forced.prepare(items).inputs["decoder_input_ids"], target[:4].expand(2, -1)], 1)
    hs = _decoder_forward(forced, items, prefix)
    torch.testing.assert_close(gen.reads["decoder.0.out@step:5"], hs[1][:, -1], atol=1e-5, rtol=1e-4)


def test_intervention_at_a_step_leaves_earlier_steps_unchanged(forced):
    items = clips(2)
    positions = [f"step:{t}" for t in range(1, 5)]
    clean = forced.generate(items, 4, ["decoder.1.mlp_down"], positions)
    edited = forced.generate(items, 4, ["decoder.1.mlp_down"], positions, edits=[
        Edit(site="decoder.1.mlp_down", op="set", positions="last", units=[0, 1], value=[9.0, -9.0], steps=[3, 4])])
    for t in (1, 2):
        torch.testing.assert_close(edited.reads[f"decoder.1.mlp_down@step:{t}"],
                                   clean.reads[f"decoder.1.mlp_down@step:{t}"])
    for t in (3, 4):
        assert edited.reads[f"decoder.1.mlp_down@step:{t}"][:, :2].tolist() == [[9.0, -9.0]] * 2
    torch.testing.assert_close(edited.sequences[:, :6], clean.sequences[:, :6])


def test_outputs_report_detected_or_forced_language(whisper):
    gen = whisper.generate(clips(2), 3)
    assert all(o["language_detected"] and o["language"] in whisper.plugin.languages for o in gen.outputs)
    whisper.plugin.configure(language="fr")
    try:
        gen = whisper.generate(clips(2), 3)
    finally:
        whisper.plugin.configure(language=None)
    assert [(o["language"], o["language_detected"]) for o in gen.outputs] == [("fr", False)] * 2


def test_a_detected_language_is_detected_under_the_runs_edits(whisper):
    """Detection runs the ``<|startoftranscript|>`` pass with the prompt-pass edits applied (Whisper's rule on the
    edited logits); without edits it is ``detect_language``; edits at later steps only leave it alone."""
    plugin = whisper.plugin
    items = clips(3)
    plain = [o["language"] for o in whisper.generate(items, 2).outputs]
    feats = whisper.prepare(items).generate_inputs["input_features"]
    ids = plugin.model.detect_language(feats).tolist()
    id_to_lang = {i: t[2:-2] for t, i in plugin.model.generation_config.lang_to_id.items()}
    assert plain == [id_to_lang[i] for i in ids]
    target = next(lang for lang in plugin.languages if lang not in plain)
    last = f"decoder.{plugin.resolved['decoder'].num_layers - 1}.out"
    w_u = whisper.view.unembedding([plugin.model.generation_config.lang_to_id[f"<|{target}|>"]])[0]
    push = Edit(last, "add", positions="last", value=w_u / (w_u @ w_u) * 1e4)  # dominates the last state
    steered = whisper.generate(items, 2, edits=[push])
    assert [(o["language"], o["language_detected"]) for o in steered.outputs] == [(target, True)] * 3
    later = whisper.generate(items, 2, edits=[Edit(last, "add", positions="last", value=w_u * 1e4, steps=[2])])
    assert [o["language"] for o in later.outputs] == plain


def _manifest(tmp_path, with_text: bool = True):
    import soundfile as sf

    lines = []
    for i, lang in enumerate(["de", "fr", "en", "de"]):
        sf.write(tmp_path / f"c{i}.wav", tone(150 + 60 * i, 0.5 + 0.2 * i), SR)
        lines.append({"id": f"c{i}", "audio": f"c{i}.wav", "labels": {"language": lang}})
    if with_text:
        lines.append({"id": "t0", "text": "hallo", "labels": {"language": "de"}})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_generate_analysis_writes_outputs_with_and_without_intervention(tmp_path, capsys):
    data = _manifest(tmp_path)
    out = tmp_path / "gen"
    code = main(["run", "--model", "whisper", "--checkpoint", "tiny", "--analysis", "generate:max_new_tokens=4",
                 "--data", str(data), "--out", str(out), "--batch-size", "3"])
    text = capsys.readouterr()
    assert code == 0, text
    assert "Leaving out 1 of 5 items" in text.out
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert all(isinstance(r["output"], str) and r["language_detected"] for r in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and "outputs.jsonl" in record["files"]
    assert record["dataset"]["left_out"] == 1

    out2 = tmp_path / "gen-iv"
    code = main(["run", "--model", "whisper:language=label:language", "--checkpoint", "tiny", "--analysis",
                 "generate:max_new_tokens=4", "--data", str(data), "--out", str(out2), "--intervention",
                 "layer-enrich:layer=0,gap=1,scale=20,stack=decoder"])
    captured = capsys.readouterr()
    assert code == 0, captured
    base = [json.loads(x) for x in (out2 / "baseline_outputs.jsonl").read_text().splitlines()]
    edited = [json.loads(x) for x in (out2 / "outputs.jsonl").read_text().splitlines()]
    assert [r["language"] for r in base] == ["de", "fr", "en", "de"]
    results = json.loads((out2 / "results.json").read_text())
    changed = sum(a["output"] != b["output"] for a, b in zip(base, edited))
    assert results["summary"]["outputs changed by the intervention"] == changed


def test_info_and_logitlens_run_on_tiny(tmp_path, capsys):
    assert main(["info", "--model", "whisper", "--checkpoint", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "decoder" in text and "cross_q" in text and "speech" in text
    out = tmp_path / "lens"
    code = main(["run", "--model", "whisper", "--checkpoint", "tiny", "--analysis",
                 "logitlens:label=language,positions=last", "--data", str(_manifest(tmp_path, False)),
                 "--out", str(out)])
    assert code == 0, capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["labels"] == ["de", "en", "fr"]
    # the label words are Whisper's language tokens
    assert 0.0 <= results["summary"]["accuracy (baseline @last)"] <= 1.0


def test_an_assistant_prefix_is_read_as_the_start_of_the_transcript(forced):
    """Seed 004 on Whisper: the decoder reads the transcript after its control tokens, each token a position of
    its ``text`` span; right padding leaves a shorter row's states as they are alone."""
    from lalm_probe.core.model import Prompt

    items = clips(2)
    texts = {"w0": "hello there", "w1": "a much longer transcript than the other one"}
    prompt_fn = lambda it: Prompt(assistant_prefix=texts[it.id])  # noqa: E731
    prepared = forced.prepare(items, prompt_fn=prompt_fn)
    tok = forced.plugin.tokenizer
    for b, it in enumerate(items):
        pos = prepared.rows[b]["decoder"]
        s, e = pos.spans["text"]
        assert s == 4 and prepared.inputs["decoder_input_ids"][b, s:e].tolist() == tok(
            " " + texts[it.id], add_special_tokens=False)["input_ids"]
    both = forced.run(items, ["decoder.1.out"], ["all:text", "last"], prompt_fn=prompt_fn)
    alone = forced.run(items[:1], ["decoder.1.out"], ["all:text", "last"], prompt_fn=prompt_fn)
    torch.testing.assert_close(both["decoder.1.out@all:text"][0], alone["decoder.1.out@all:text"][0])
    torch.testing.assert_close(both["decoder.1.out@last"][:1], alone["decoder.1.out@last"])
    with pytest.raises(UserError, match="forward reads only"):
        forced.generate(items, 2, ["decoder.1.out"], ["step:1"], prompt_fn=prompt_fn)
