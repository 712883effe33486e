"""The SeamlessM4T v2 plugin on the tiny real architecture: stacks, both encoders, decoding, positions, options, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit
from lalm_probe.plugins.models.seamless_m4t_v2 import TINY_LANGS, SeamlessM4Tv2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and spinning OpenMP workers are slow on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plugin(probe_cache):
    return SeamlessM4Tv2.load("tiny")


@pytest.fixture(autouse=True)
def default_options(plugin):
    plugin.options = dict(plugin.option_defaults)
    yield
    plugin.options = dict(plugin.option_defaults)


# One session per modality: the engine caches module execution order from the first batch it sees, and a speech
# batch never runs the text encoder (and vice versa).
@pytest.fixture(scope="module")
def speech(plugin):
    return Session(plugin)


@pytest.fixture(scope="module")
def text(plugin):
    return Session(plugin)


def clips():
    return [Stimulus("long", audio=tone(440, 1.0), sample_rate=SR, labels={"language": "en", "target": "hello"}),
            Stimulus("short", audio=tone(220, 0.43), sample_rate=SR, labels={"language": "fr", "target": "salut"}),
            Stimulus("mid", audio=tone(300, 0.7), sample_rate=SR, labels={"language": "de", "target": "hallo"})]


def texts():
    return [Stimulus("t-en", text="hello world", labels={"language": "en", "target": "hello"}),
            Stimulus("t-fr", text="bonjour", labels={"language": "fr", "target": "salut"}),
            Stimulus("t-zh", text="ni hao ma, how are you", labels={"language": "zh", "target": "hallo"})]


def test_tiny_round_trips_through_from_pretrained(plugin, probe_cache):
    again = SeamlessM4Tv2.load("tiny")  # the second load reads the cached save_pretrained folder
    for (n1, p1), (n2, p2) in zip(plugin.model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    langs = again.model.generation_config.text_decoder_lang_to_code_id  # survives the reload
    assert set(langs) == set(TINY_LANGS)
    assert all(again.tokenizer.convert_ids_to_tokens(i) == f"__{c}__" for c, i in langs.items())
    assert type(again.model).__name__ == "SeamlessM4Tv2Model" and again.tokenizer.padding_side == "right"


def test_describe_shows_every_stack_and_component(plugin):
    d = plugin.describe()
    assert list(d) == ["speech_encoder", "speech_adaptor", "text_encoder", "text_decoder", "cross_kv"]
    hidden, inner = plugin.model.config.hidden_size, plugin.model.config.speech_encoder_intermediate_size
    assert d["speech_encoder"]["components"] == {  # seed 002 A.8's parts, in the canonical vocabulary
        "out": hidden, "ffn1_norm": hidden, "ffn1_up": inner, "ffn1_act": inner, "ffn1_down": hidden, "ffn1": hidden,
        "attn_norm": hidden, "attn_q": hidden, "attn_k": hidden, "attn_v": hidden, "attn_o": hidden, "attn": hidden,
        "conv_norm": hidden, "conv_pw1": 2 * hidden, "conv_glu": hidden, "conv_dw": hidden, "conv_dw_norm": hidden,
        "conv_pw2": hidden, "conv": hidden, "mlp_norm": hidden, "mlp_up": inner, "mlp_act": inner,
        "mlp_down": hidden, "mlp": hidden, "final_norm": hidden}
    assert d["speech_encoder"]["extras"] == {"features": hidden, "norm": hidden}
    assert d["speech_adaptor"]["extras"] == {"output": hidden}
    assert set(d["text_encoder"]["components"]) >= {"attn_norm", "attn_q", "attn_o", "mlp_norm", "mlp_up", "mlp_down"}
    assert set(d["text_decoder"]["components"]) >= {"cross_norm", "cross_q", "cross_o", "mlp_up", "mlp_act"}
    assert d["text_decoder"]["runs"] == "per_step" and d["text_decoder"]["lens"] and d["text_decoder"]["layers"] == 4
    assert d["cross_kv"]["components"] == {"cross_k": hidden, "cross_v": hidden} and d["cross_kv"]["runs"] == "once"


def _read_everything(session, items, stacks):
    plugin = session.plugin
    patterns = [f"{s}.*.{c}" for s in stacks for c in plugin.resolved[s].paths]
    patterns += [f"{s}.{e}" for s in stacks for e in plugin.resolved[s].extras]
    return session.run(items, patterns, ["mean"])


def test_forward_from_speech_reads_every_site(speech, plugin):
    stacks = ["speech_encoder", "speech_adaptor", "text_decoder", "cross_kv"]
    out = _read_everything(speech, clips()[:2], stacks)
    hidden = plugin.model.config.hidden_size
    for key, value in out.items():
        assert value.shape[0] == 2 and torch.isfinite(value).all(), key
    assert out["speech_encoder.0.conv_pw1@mean"].shape == (2, 2 * hidden)
    assert out["speech_encoder.1.ffn1_up@mean"].shape == (2, plugin.model.config.speech_encoder_intermediate_size)
    assert out["speech_adaptor.output@mean"].shape == out["text_decoder.3.out@mean"].shape == (2, hidden)
    rows = speech.prepare(clips()[:2]).rows
    assert [r["speech_encoder"].length for r in rows] == [49, 20]  # stacked fbank frames, 50 per second
    assert [r["speech_adaptor"].length for r in rows] == [7, 3]  # the adaptor pools by 8
    assert all(r["text_decoder"].length == 2 and "text_encoder" not in r for r in rows)


def test_forward_from_text_reads_every_site(text, plugin):
    out = _read_everything(text, texts()[:2], ["text_encoder", "text_decoder", "cross_kv"])
    for key, value in out.items():
        assert value.shape[0] == 2 and torch.isfinite(value).all(), key
    prepared = text.prepare(texts()[:2])
    tok = plugin.tokenizer
    ids = prepared.inputs["input_ids"]
    for b, (row, lang) in enumerate(zip(prepared.rows, ["eng", "fra"])):
        enc = row["text_encoder"]
        valid = ids[b, enc.offset:enc.offset + enc.length].tolist()
        assert valid[0] == tok.convert_tokens_to_ids(f"__{lang}__") and valid[-1] == tok.eos_token_id
        assert tok.decode(valid[slice(*enc.spans["text"])]) == texts()[b].text
    assert prepared.rows[1]["text_encoder"].offset == 0 and prepared.inputs["attention_mask"][1, -1] == 0  # right pad
    with pytest.raises(UserError, match="does not pass through"):
        text.run(texts()[:1], ["speech_encoder.0.out"])


def test_conv_taps_are_time_major_views_of_the_conv_module(speech, plugin):
    items = clips()[:2]
    out = speech.run(items, ["speech_encoder.1.conv_pw1", "speech_encoder.1.conv_glu", "speech_encoder.1.conv_dw",
                             "speech_encoder.1.conv_dw_norm", "speech_encoder.1.conv_pw2", "speech_encoder.1.conv"],
                     ["all"])
    conv = plugin.model.speech_encoder.encoder.layers[1].conv_module
    for b in range(2):
        pw1, glu, dw, dwn, pw2, whole = (out[f"speech_encoder.1.{c}@all"][b] for c in
                                         ("conv_pw1", "conv_glu", "conv_dw", "conv_dw_norm", "conv_pw2", "conv"))
        torch.testing.assert_close(glu, torch.nn.functional.glu(pw1, dim=-1))
        torch.testing.assert_close(dwn, conv.depthwise_layer_norm(dw))
        torch.testing.assert_close(pw2, whole)  # the module's own (time-major) output, dropout off
    # An edit at a tap changes the real activation: later modules see it.
    clean = speech.run(items, ["speech_encoder.0.conv_glu", "speech_encoder.0.conv_dw"], ["mean"])
    edited = speech.run(items, ["speech_encoder.0.conv_glu", "speech_encoder.0.conv_dw"], ["mean"], edits=[
        Edit(site="speech_encoder.0.conv_glu", op="add", positions="all", value=torch.ones(64))])
    torch.testing.assert_close(edited["speech_encoder.0.conv_glu@mean"], clean["speech_encoder.0.conv_glu@mean"] + 1)
    assert not torch.allclose(edited["speech_encoder.0.conv_dw@mean"], clean["speech_encoder.0.conv_dw@mean"])


def test_plugin_hooks_leave_an_unpadded_clip_unchanged(speech, plugin, probe_cache):
    """Taps and adaptor masking only act on padding: one clip gives the plain HF model's outputs."""
    from transformers import SeamlessM4Tv2Model

    raw = SeamlessM4Tv2Model.from_pretrained(SeamlessM4Tv2.source("tiny")).eval()
    item = [Stimulus("odd", audio=tone(330, 0.77), sample_rate=SR)]  # an odd frame count: the processor pads one
    inputs = speech.prepare(item).inputs
    with torch.no_grad():
        ours, theirs = plugin.model(**inputs), raw(**inputs)
    torch.testing.assert_close(ours.logits, theirs.logits)
    torch.testing.assert_close(ours.encoder_last_hidden_state, theirs.encoder_last_hidden_state)


def _assert_alone_equals_batched(session, items, sites, positions):
    together = session.run(items, sites, positions)
    for i, item in enumerate(items):
        alone = session.run([item], sites, positions)
        for key, value in alone.items():
            torch.testing.assert_close(value[0], together[key][i], atol=1e-5, rtol=1e-4, msg=f"{item.id} {key}")


def test_padding_invariance_speech(speech, plugin):
    plugin.configure(tgt_lang="label:language")  # three target languages in one batch, too
    _assert_alone_equals_batched(speech, clips(), ["speech_encoder.*.out", "speech_encoder.1.conv_dw",
                                                   "speech_adaptor.0.out", "speech_adaptor.output", "cross_kv.*.cross_k",
                                                   "text_decoder.*.out"], ["mean", "last"])


def test_padding_invariance_text(text, plugin):
    plugin.configure(tgt_lang="label:language")
    _assert_alone_equals_batched(text, texts(), ["text_encoder.*.out", "text_encoder.norm", "cross_kv.*.cross_v",
                                                 "text_decoder.*.out"], ["mean", "last"])


def test_decoder_prompt_and_forced_generation_decode(speech, text, plugin):
    plugin.configure(tgt_lang="label:language")
    tok = plugin.tokenizer
    for session, items, langs in ((speech, clips(), ("eng", "fra", "deu")), (text, texts(), ("eng", "fra", "cmn"))):
        prepared = session.prepare(items)
        prompt = prepared.inputs["decoder_input_ids"].tolist()
        assert prompt == [[tok.eos_token_id, tok.convert_tokens_to_ids(f"__{c}__")] for c in langs]
        assert prepared.generate_inputs["generate_speech"] is False
        gen = session.generate(items, 5, force_target="target")
        assert gen.sequences[:, :2].tolist() == prompt  # generate keeps the prompt in front
        assert [o["output"] for o in gen.outputs] == ["hello", "salut", "hallo"]
        assert [o["language"] for o in gen.outputs] == list(langs)
    free = speech.generate(clips()[:2], 3)  # unforced greedy decoding decodes too (random weights: any text)
    assert len(free.outputs) == 2 and all(isinstance(o["output"], str) for o in free.outputs)


def test_mixed_targets_in_one_batch_match_hf_generate_per_language(speech, plugin):
    plugin.configure(tgt_lang="label:language")
    items = clips()[:2]
    gen = speech.generate(items, 4)
    for b, lang in enumerate(("eng", "fra")):
        inputs = speech.prepare([items[b]]).inputs
        with torch.no_grad():
            ref = plugin.model.generate(input_features=inputs["input_features"],
                                        attention_mask=inputs["attention_mask"], tgt_lang=lang,
                                        generate_speech=False, max_new_tokens=4, min_new_tokens=4,
                                        do_sample=False, num_beams=1).sequences
        assert gen.sequences[b].tolist() == ref[0].tolist()


def _decoder_layer_by_hand(plugin, inputs, prefix, layer):
    """A plain forward pass over the decoder prompt + ``prefix``, reading one decoder layer with a torch hook."""
    seen = {}
    handle = plugin.model.text_decoder.layers[layer].register_forward_hook(lambda m, a, o: seen.update(h=o))
    try:
        with torch.no_grad():
            plugin.model(**dict(inputs, decoder_input_ids=torch.cat([inputs["decoder_input_ids"], prefix], 1)))
    finally:
        handle.remove()
    return seen["h"]


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_per_step_reads_match_forced_prefix_forward_passes(request, plugin, modality):
    session = request.getfixturevalue(modality)
    items = (clips() if modality == "speech" else texts())[:2]
    n = 3
    gen = session.generate(items, n, ["text_decoder.2.out"], [f"step:{t}" for t in range(1, n + 1)] + ["prefix:3"],
                           force_target="target")
    inputs = session.prepare(items).inputs
    new = gen.sequences[:, 2:]
    for t in range(1, n + 1):
        h = _decoder_layer_by_hand(plugin, inputs, new[:, : t - 1], 2)
        torch.testing.assert_close(gen.reads[f"text_decoder.2.out@step:{t}"], h[:, -1], atol=1e-5, rtol=1e-4)
    h = _decoder_layer_by_hand(plugin, inputs, new[:, :2], 2)
    torch.testing.assert_close(gen.reads["text_decoder.2.out@prefix:3"], h.mean(1), atol=1e-5, rtol=1e-4)


def test_lens_of_the_last_decoder_layer_scores_the_language_token(speech, plugin):
    words = plugin.label_words("language")
    assert words["en"] == "__eng__" and words["zh"] == "__cmn__" and words["ja"] == "__jpn__"
    assert {words[k] for k in ("en", "fr", "de", "es", "zh", "ja", "id", "it", "ko", "ru", "vi")} == {
        f"__{c}__" for c in TINY_LANGS}
    assert plugin.label_words("gender") is None
    ids = [plugin.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words.values()]
    assert all(len(i) == 1 for i in ids)  # one token each: the lens can score them
    items = clips()[:2]
    inputs = speech.prepare(items).inputs
    with torch.no_grad():
        logits = plugin.model(**inputs).logits[:, -1]  # the prompt pass predicts the first output token
    h = speech.run(items, ["text_decoder.3.out"], ["last"])["text_decoder.3.out@last"]
    torch.testing.assert_close(speech.lens(h), logits, atol=1e-5, rtol=1e-4)


def test_language_options(plugin):
    item = Stimulus("x", text="hi", labels={"language": "zh", "lang3": "ita"})
    for value, code in (("fra", "fra"), ("fr", "fra"), ("French", "fra"), ("__deu__", "deu"), ("zh-CN", "cmn"),
                        ("label:language", "cmn"), ("label:lang3", "ita")):
        plugin.configure(tgt_lang=value)
        assert plugin.target_language(item) == code
    assert plugin.source_language(item) == "cmn"  # default: the item's language label
    assert plugin.target_ids("hello") == plugin.tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert plugin.tokenizer.eos_token_id not in plugin.target_ids("hello world")


def test_unknown_languages_are_one_clear_error(text, plugin):
    plugin.configure(tgt_lang="xx")
    with pytest.raises(UserError, match=r"no target language 'xx'.*Supported: cmn, deu, eng"):
        text.prepare(texts()[:1])
    plugin.configure(tgt_lang="label:accent")
    with pytest.raises(UserError, match="no label 'accent'"):
        text.prepare(texts()[:1])
    plugin.configure(tgt_lang="eng")
    with pytest.raises(UserError, match="no source language 'pt'"):
        text.prepare([Stimulus("p", text="ola", labels={"language": "pt"})])
    with pytest.raises(UserError, match="no label 'language' for src_lang"):
        text.prepare([Stimulus("n", text="hi")])
    with pytest.raises(UserError, match="unknown option"):
        plugin.configure(language="en")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_cli_info_shows_the_stacks(capsys):
    code, out = run_cli(capsys, "info", "--model", "seamless-m4t-v2", "--checkpoint", "tiny")
    assert code == 0, out
    for word in ("speech_encoder: 2 layers", "text_encoder: 2 layers", "text_decoder: 4 layers", "cross_kv",
                 "logit lens stack: text_decoder", "facebook/seamless-m4t-v2-large"):
        assert word in out
    assert re.search(r"speech_encoder\.<0\.\.1>\.conv_dw +64 +Conformer: depthwise convolution output", out)
    assert re.search(r"text_decoder\.<0\.\.3>\.cross_q +64 ", out)


def test_cli_run_logitlens(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "run", "--model", "seamless-m4t-v2", "--checkpoint", "tiny", "--analysis",
                         "logitlens:label=gender", "--data", str(gender_manifest), "--out", str(out),
                         "--batch-size", "5")
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["stack"] == "text_decoder" and 0 <= results["summary"]["accuracy (baseline @last)"] <= 1
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
