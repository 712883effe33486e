"""The Phi-4-multimodal plugin on a tiny real ``Phi4MultimodalForCausalLM``: its prompt and audio span against the real
``Phi4MultimodalProcessor``, the speech LoRA's sites against its weights, encoder sites against the modules, loading
and the CLI. (probe check in tests/core/test_check.py covers padding, hidden states, the lens and decode steps.)"""

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
from lalm_probe.plugins.models.phi4_multimodal import Phi4Multimodal

PROMPT = "What is said?"


@pytest.fixture(scope="module")
def phi(probe_cache):
    return Session(Phi4Multimodal.load("tiny"))


@pytest.fixture
def clips(tmp_path):
    """Two wav files of different lengths, as speech items with the same instruction."""
    items = []
    for name, seconds in (("long", 1.0), ("short", 0.45)):
        sf.write(tmp_path / f"{name}.wav", tone(220, seconds), SR)
        items.append(Stimulus(name, audio=str(tmp_path / f"{name}.wav"), prompt=PROMPT))
    return items


def test_the_prompt_is_the_processors_chat_template_with_one_audio_token_per_80_ms(phi, clips):
    processor, audio_id = phi.plugin.processor, phi.plugin.tokenizer.audio_token_id
    prepared = phi.prepare([*clips, Stimulus("text", text="hello world", prompt="Repeat it.")])
    convs = [[{"role": "user", "content": [{"type": "audio", "path": it.audio}, {"type": "text", "text": PROMPT}]}]
             for it in clips] + [[{"role": "user", "content": [{"type": "text", "text": "hello world\nRepeat it."}]}]]
    assert processor.apply_chat_template(convs[0], add_generation_prompt=True, tokenize=False) == \
        f"<|user|><|audio|>{PROMPT}<|end|><|assistant|>"
    for b, (conv, seconds) in enumerate(zip(convs, (1.0, 0.45, None))):
        ref = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        lm = prepared.rows[b]["lm"]
        ids = prepared.inputs["input_ids"][b, lm.offset:lm.offset + lm.length].tolist()
        assert ids == ref["input_ids"][0].tolist()  # the same tokens inside a left-padded batch
        if seconds is None:
            assert "audio" not in lm.spans and audio_id not in ids
            continue
        # the feature extractor's 25 ms windows every 10 ms, then one embedding per 8 frames (rounded up)
        frames = (int(SR * seconds) - 400) // 160 + 1
        start, end = lm.spans["audio"]
        assert end - start == math.ceil(frames / 8) == int(ref["audio_embed_sizes"][0])
        assert set(ids[start:end]) == {audio_id} and audio_id not in ids[:start] + ids[end:]
        assert prepared.rows[b]["audio_encoder"].length == end - start
        assert phi.plugin.tokenizer.decode(ids[slice(*lm.spans["text"])]) == PROMPT


def test_the_speech_lora_sites_are_the_adapters_own_outputs(phi, clips):
    names = [f"{s}.1.{c}" for s, c in [("lm", "attn_norm"), ("lm", "attn_qkv"), ("speech_lora", "attn_qkv_a"),
                                        ("speech_lora", "attn_qkv_b"), ("lm", "mlp_act"), ("lm", "mlp_down"),
                                        ("speech_lora", "mlp_down_a"), ("speech_lora", "mlp_down_b")]]
    r = {k.split("@")[0]: v for k, v in phi.run(clips, names, ["last"]).items()}
    layer = phi.plugin.model.model.layers[1]
    for x, proj, name in ((r["lm.1.attn_norm"], layer.self_attn.qkv_proj, "attn_qkv"),
                          (r["lm.1.mlp_act"], layer.mlp.down_proj, "mlp_down")):
        code = x @ proj.lora_A["speech"].weight.T
        update = code @ proj.lora_B["speech"].weight.T
        torch.testing.assert_close(r[f"speech_lora.1.{name}_a"], code)
        torch.testing.assert_close(r[f"speech_lora.1.{name}_b"], update)
        # the LM's site is the adapted projection: base + (alpha / r) * update, alpha / r = 2 as in the release
        torch.testing.assert_close(r[f"lm.1.{name}"], x @ proj.base_layer.weight.T + 2.0 * update)


def test_the_lora_follows_the_input_as_released_unless_the_option_says_otherwise(phi, clips):
    text = Stimulus("text", text="hello world", prompt="Repeat it.")
    with pytest.raises(UserError, match="does not pass through 'speech_lora'"):
        phi.run([text], ["speech_lora.0.attn_o_b"])
    auto = {it.id: phi.run([it], ["lm.3.out"])["lm.3.out@last"] for it in (clips[0], text)}
    try:
        phi.plugin.configure(lora="off")
        off = {it.id: phi.run([it], ["lm.3.out"])["lm.3.out@last"] for it in (clips[0], text)}
        phi.plugin.configure(lora="on")
        on = phi.run([text], ["lm.3.out", "speech_lora.0.attn_o_b"])
        with pytest.raises(UserError, match="auto, on or off"):
            phi.plugin.configure(lora="sometimes")
    finally:
        phi.plugin.configure(lora="auto")
    torch.testing.assert_close(auto["text"], off["text"])  # text alone runs the base LM
    assert not torch.allclose(auto["long"], off["long"], atol=1e-3)  # speech runs the adapted LM
    assert not torch.allclose(on["lm.3.out@last"], auto["text"], atol=1e-3)
    assert on["speech_lora.0.attn_o_b@last"].shape == (1, phi.width("lm.0.attn_o"))


def test_encoder_sites_read_the_modules_time_major_and_the_projector_fills_the_audio_span(phi, clips):
    model = phi.plugin.model
    seen = {}
    hooks = [model.get_submodule(path).register_forward_hook(lambda m, a, out, key=key: seen.update({key: out}))
             for key, path in (("dw", "model.embed_tokens_extend.audio_embed.encoder.encoders.0.conv.dw_sep_conv_1d"
                                      ".dw_conv"), ("embeds", "model.embed_tokens_extend"))]
    try:
        reads = phi.run(clips, ["audio_encoder.0.conv_dw", "audio_encoder.projector"], ["all"])
    finally:
        for h in hooks:
            h.remove()
    prepared = phi.prepare(clips)
    for b, row in enumerate(prepared.rows):
        n = row["audio_encoder"].length
        torch.testing.assert_close(reads["audio_encoder.0.conv_dw@all"][b], seen["dw"][b, :, :n].T)
        start, end = row["lm"].spans["audio"]
        at = row["lm"].offset
        torch.testing.assert_close(reads["audio_encoder.projector@all"][b], seen["embeds"][b, at + start:at + end])
    widths = phi.plugin.describe()["audio_encoder"]["components"]
    assert widths["ffn1_up"] == 2 * widths["ffn1_act"] and widths["conv_pw1"] == 2 * widths["conv_glu"]


def test_the_tiny_instance_round_trips_with_its_adapter_and_a_bad_checkpoint_is_one_sentence(phi, tmp_path):
    again = Phi4Multimodal.load("tiny")  # the cached save_pretrained folder, through the plugin's own loading
    theirs = dict(again.model.named_parameters())
    assert any(".lora_B.speech." in name for name in theirs)
    for name, p in phi.plugin.model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    with pytest.raises(UserError, match="Could not load phi4-multimodal checkpoint"):
        Phi4Multimodal.load(str(tmp_path))


def test_a_clip_the_encoder_would_fold_into_chunks_is_refused_by_name(phi):
    with pytest.raises(UserError, match="Item 'long' is longer than 40 s"):
        phi.prepare([Stimulus("long", audio=tone(220, 41.0), sample_rate=SR, prompt=PROMPT)])


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_list_and_info_show_the_model_its_stacks_and_checkpoints(capsys):
    code, out = run_cli(capsys, "list")
    assert code == 0 and "phi4-multimodal" in out
    code, out = run_cli(capsys, "info", "--model", "phi4-multimodal", "--checkpoint", "tiny", "--json")
    about = json.loads(out)
    assert code == 0 and about["checkpoints"] == ["microsoft/Phi-4-multimodal-instruct"]
    assert set(about["stacks"]) == {"audio_encoder", "lm", "speech_lora"} and about["options"] == {"chat_template": True, "lora": "auto"}


@pytest.mark.parametrize("analysis", ["logitlens:attribute=gender", "clusters:labels=[gender],space=full"])
def test_probe_run_on_a_manifest_of_wav_files(capsys, tmp_path, gender_manifest, analysis):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "run", "--model", "phi4-multimodal", "--checkpoint", "tiny", "--analysis", analysis,
                         "--data", str(gender_manifest), "--out", str(out), "--batch-size", "6")
    assert code == 0, text
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert json.loads((out / "results.json").read_text())["summary"]
