"""`probe check`: every registered model plugin passes on its tiny instance; broken plugins fail with one clear line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core import cli
from lalm_probe.core.check import run_checks
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.registry import discover
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.qwen2audio import Qwen2Audio
from lalm_probe.plugins.models.qwen3_omni import Qwen3Omni

MODELS = discover().names("model")  # built-in and installed third-party plugins alike


@pytest.mark.parametrize("name", MODELS)
def test_every_registered_model_passes_every_check_on_its_tiny_instance(name):
    cls = discover().get("model", name)
    if cls.tiny is None:
        pytest.skip(f"{name} declares no tiny instance")
    findings = run_checks(lambda: cls.load("tiny"))
    assert [f.line() for f in findings if not f.ok] == []
    assert {f.check for f in findings} == {"paths", "sites", "hidden_states", "lens", "padding", "spans", "steps",
                                           "step_edit", "generate"}


def _lm_stack(**changes) -> Stack:
    fields = dict(layers=("model.language_model.layers",), runs="per_step", components=decoder_layer(),
                  final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states")
    return Stack("lm", **{**fields, **changes})


class WrongPath(Qwen2Audio):
    name = "broken-path"
    stacks = (Qwen2Audio.stacks[0], _lm_stack(components=decoder_layer(q="query")))


class WrongWidth(Qwen2Audio):
    name = "broken-width"
    stacks = (Qwen2Audio.stacks[0], _lm_stack(components={**decoder_layer(), "mlp_up": Component("mlp.up_proj",
                                                                                                 width=99)}))


class PaddingLeak(Qwen2Audio):
    """Forgets the attention mask, so padded positions are attended to."""

    name = "broken-padding"

    def prepare(self, items, audio, prompts):
        prepared = super().prepare(items, audio, prompts)
        del prepared.inputs["attention_mask"]
        return prepared


class NaNAudio(Qwen2Audio):
    """Feeds NaN features: every audio read is NaN, alone and in a batch alike."""

    name = "broken-nan"

    def prepare(self, items, audio, prompts):
        prepared = super().prepare(items, audio, prompts)
        if "input_features" in prepared.inputs:
            prepared.inputs["input_features"] = prepared.inputs["input_features"] * float("nan")
        return prepared


class ExpertWidth(Qwen3Omni):
    """Declares one expert's output as wide as its activation."""

    name = "broken-omni-expert-width"

    def setup(self):
        super().setup()
        self.stacks = tuple(replace(st, components={**st.components, "expert3_out": Component(
            "mlp.experts.probe_tap.3.out", width=32)}) if st.name == "lm" else st for st in self.stacks)


class LensWithoutNorm(Qwen2Audio):
    name = "broken-lens"
    stacks = (Qwen2Audio.stacks[0], _lm_stack(final_norm=()))


@pytest.mark.parametrize("broken, check, says", [
    (WrongPath, "paths", "lm.0.attn_q: none of the module paths ['self_attn.query'] exists in Qwen2DecoderLayer"),
    (WrongWidth, "sites", "lm.0.mlp_up: read shape (3, 128), declared width 99"),
    (PaddingLeak, "padding", "alone and in a padded batch differ"),
    (LensWithoutNorm, "lens", "lm.7.out: the lens gives logits"),
    (ExpertWidth, "sites", "lm.0.expert3_out: read shape (3, 64), declared width 32"),
    (NaNAudio, "padding", "alone and in a padded batch differ by inf"),  # NaN never compares as "no difference"
])
def test_a_broken_plugin_fails_its_check_with_one_clear_line(broken, check, says):
    findings = run_checks(lambda: broken.load("tiny"), None if check == "paths" else [check])
    failed = [f for f in findings if not f.ok]
    assert failed and all(f.check == check for f in failed)
    assert any(says in f.line() for f in failed), [f.line() for f in failed]
    assert all("\n" not in f.line() for f in failed)


def test_the_cli_exits_1_on_a_failed_check_and_2_on_a_user_error(capsys, monkeypatch):
    registry = discover(extra_modules=[LensWithoutNorm])
    monkeypatch.setattr(cli, "_registry", lambda: registry)
    assert cli.main(["check", "--model", "broken-lens", "--checkpoint", "tiny", "--only", "lens"]) == 1
    out = capsys.readouterr().out
    assert "FAIL lens: [speech] lm.7.out: the lens gives logits" in out and "2 failure(s)" in out
    assert cli.main(["check", "--model", "qwen2audio", "--checkpoint", "tiny", "--only", "lens"]) == 0
    assert cli.main(["check", "--model", "no-such-model"]) == 2
    assert cli.main(["check", "--model", "qwen2audio", "--only", "nonsense"]) == 2


@pytest.mark.parametrize("name, stack, down", [
    ("qwen2audio", "lm", "model.language_model.layers.{}.mlp.down_proj"),
    ("whisper", "decoder", "model.decoder.layers.{}.fc2"),
    ("seamless-m4t-v2", "text_decoder", "text_decoder.layers.{}.ffn.fc2"),
])
def test_one_canonical_site_runs_unchanged_on_every_model(name, stack, down):
    """`<stack>.*.mlp_act` is the MLP's hidden activation everywhere: the input of its output projection."""
    plugin = discover().get("model", name).load("tiny")
    session = Session(plugin)
    items = [Stimulus("a", audio=tone(200, 0.8), sample_rate=SR, labels={"language": "en"})]
    seen = {}
    hooks = [plugin.model.get_submodule(down.format(i)).register_forward_pre_hook(
        lambda m, args, i=i: seen.__setitem__(i, args[0])) for i in range(plugin.resolved[stack].num_layers)]
    try:
        reads = session.run(items, [f"{stack}.*.mlp_act"], ["last"])
    finally:
        for h in hooks:
            h.remove()
    for i, x in seen.items():
        value = reads[f"{stack}.{i}.mlp_act@last"]
        assert value.shape == (1, session.width(f"{stack}.{i}.mlp_act"))
        torch.testing.assert_close(value[0], x[0, -1])
