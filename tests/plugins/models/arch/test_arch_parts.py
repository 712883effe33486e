"""The hand-written parts under the three families: Kaldi fbank, BEATs, PEFT-style LoRA, row layout, nnsight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from arch_helpers import clips
from lalm_probe.plugins.models.arch.kaldi_fbank import fbank
from lalm_probe.plugins.models.arch.layout import left_pad, scatter_audio, token_span
from lalm_probe.plugins.models.arch.lora import LoraLinear, PeftCausalLM, inject_lora
from lalm_probe.plugins.models.arch.salmonn_beats import BEATs, BEATsConfig
from lalm_probe.plugins.models.arch.salmonn_io import TINY_BEATS


@pytest.mark.parametrize("seconds", [0.03, 1.0, 2.37])
def test_fbank_equals_kaldi_native_fbank(seconds):
    """BEATs' ``ta_kaldi.fbank(wave * 2**15, num_mel_bins=128, frame_length=25, frame_shift=10)`` defaults, against
    the k2 reference implementation with dither off (float32 FFT noise only)."""
    knf = pytest.importorskip("kaldi_native_fbank")
    wave = (np.random.RandomState(1).randn(int(16000 * seconds)) * 0.1).astype(np.float32) * 2 ** 15
    opts = knf.FbankOptions()
    opts.frame_opts.dither, opts.mel_opts.num_bins = 0.0, 128
    ref = knf.OnlineFbank(opts)
    ref.accept_waveform(16000, wave.tolist())
    ref.input_finished()
    expected = np.array([ref.get_frame(i) for i in range(ref.num_frames_ready)]).reshape(-1, 128)
    ours = fbank(torch.from_numpy(wave)).numpy()
    assert ours.shape == expected.shape == (max(0, 1 + (len(wave) - 400) // 160), 128)
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=1e-4)


def test_beats_gives_each_clip_in_a_padded_batch_what_it_gives_alone():
    torch.manual_seed(0)
    beats = BEATs(BEATsConfig.from_dict(TINY_BEATS)).eval()
    a, b = (torch.from_numpy(c) for c in clips())
    waves = torch.zeros(2, len(a))
    waves[0], waves[1, : len(b)] = a, b
    lens = torch.tensor([len(a), len(b)])
    with torch.no_grad():
        together = beats.extract_features(waves, lens)
        valid = beats.output_lengths(lens).tolist()
        assert valid == [6 * 8, 2 * 8]  # (98 // 16) and (38 // 16) time patches x 8 frequency patches
        for i, w in enumerate((a, b)):
            alone = beats.extract_features(w[None], lens[i: i + 1])
            torch.testing.assert_close(together[i, : valid[i]], alone[0], atol=1e-5, rtol=1e-5)


def test_beats_relative_buckets_follow_the_release_formula():
    """``_relative_positions_bucket`` (bidirectional, 320 buckets, max distance 800): exact up to 79, log-spaced
    after, the sign in the upper half."""
    attn = BEATs(BEATsConfig.from_dict({**TINY_BEATS, "num_buckets": 320, "max_distance": 800})).encoder.layers[0]
    buckets = attn.self_attn._buckets(torch.tensor([0, 1, -1, 79, 80, 400, 5000, -5000]))
    large = lambda d: min(80 + int(np.log(d / 80) / np.log(800 / 80) * 80), 159)  # noqa: E731
    assert buckets.tolist() == [0, 161, 1, 160 + 79, 160 + large(80), 160 + large(400), 159 + 160, 159]


def test_lora_keeps_peft_names_and_adds_the_scaled_update():
    lm = torch.nn.Sequential()
    lm.add_module("q_proj", torch.nn.Linear(6, 4))
    lm.add_module("k_proj", torch.nn.Linear(6, 4))
    base = lm.q_proj.weight.detach().clone()
    assert inject_lora(lm, ["q_proj"], r=2, alpha=8) == 1
    wrapped = PeftCausalLM(lm)
    assert sorted(wrapped.state_dict()) == [
        "base_model.model.k_proj.bias", "base_model.model.k_proj.weight", "base_model.model.q_proj.bias",
        "base_model.model.q_proj.lora_A.default.weight", "base_model.model.q_proj.lora_B.default.weight",
        "base_model.model.q_proj.weight"]
    q = lm.q_proj
    assert isinstance(q, LoraLinear) and torch.equal(q.weight, base)
    x = torch.randn(5, 6)
    torch.testing.assert_close(q(x), x @ base.T + q.bias)  # lora_B starts at zero: identity update
    torch.nn.init.normal_(q.lora_B["default"].weight)
    update = x @ q.lora_A["default"].weight.T @ q.lora_B["default"].weight.T
    torch.testing.assert_close(q(x), x @ base.T + q.bias + 4.0 * update)


def test_layout_helpers():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert token_span([(0, 0), (0, 2), (-1, -1), (2, 5), (5, 6)], 1, 5) == (1, 4)
    embeds = torch.zeros(3, 4, 1)
    audio = torch.arange(1, 7, dtype=torch.float).view(3, 2, 1)  # three clips of two rows each
    out = scatter_audio(embeds, audio, torch.tensor([1, 0, 2]), torch.tensor([2, 1, 2]), torch.tensor([1, 0, 2]))
    assert out[..., 0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0], [3, 0, 5, 6]]


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output'")  # BERT's own name; see E_output
@pytest.mark.parametrize("family", ["ultravox", "desta2", "salmonn"])
def test_nnsight_reads_lm_layers_and_steps_through_generate(family, request):
    """The models trace like transformers models: a layer read equals ``output_hidden_states``, and ``generate``
    iterates per decode step (prompt pass, then one position per step)."""
    from nnsight import NNsight

    tiny = request.getfixturevalue(family)
    model, proc = tiny.model, tiny.processor
    if family == "desta2":
        batch = proc([proc.messages("Hi", audio=True)], [clips()[0]], [" x"])
    else:
        batch = proc([proc.render("Hi", audio=True)], [clips()[0]])
    layers = {"ultravox": "language_model.model.layers", "desta2": "llama.model.layers",
              "salmonn": "llama_model.base_model.model.model.layers"}[family]
    nm = NNsight(model)
    layer = nm
    for part in layers.split("."):
        layer = getattr(layer, part)
    with torch.no_grad():
        hidden = model(**batch.inputs, output_hidden_states=True).hidden_states[1]
        with nm.trace(**batch.inputs):
            read = layer[0].output.save()
        steps = []
        with nm.trace(**batch.inputs, fn=model.generate, max_new_tokens=3, min_new_tokens=3,
                      do_sample=False) as tracer:
            for _ in tracer.iter[0:3]:
                steps.append(layer[-1].output.save())
    torch.testing.assert_close(read, hidden)
    length = batch.inputs["input_ids"].shape[1]
    assert [s.shape[1] for s in steps] == [length, 1, 1]
