"""The Qwen2.5-Omni and Qwen3-Omni thinker plugins on their tiny real architectures: prompts and audio spans against
the real processor classes, per-clip reads and edits of the packed audio towers, Qwen3-Omni's router and experts,
loading a full (thinker + talker) checkpoint, and the CLI. Padding, hidden states, the lens and decode steps are
covered by ``probe check`` (tests/core/test_check.py).

The real processors are built here from the tiny checkpoint's tokenizer, feature extractor and chat template, with
their image and video processors left out (the class check that demands them is bypassed for the test only; neither
runs without images or videos): the plugins' inputs are compared with what that processor code computes.
"""

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
from lalm_probe.core.experts import PARTS
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Edit
from lalm_probe.plugins.models.qwen2_5_omni import Qwen25Omni
from lalm_probe.plugins.models.qwen3_omni import Qwen3Omni

PLUGINS = {"qwen2.5-omni": (Qwen25Omni, "Qwen2_5OmniProcessor"), "qwen3-omni": (Qwen3Omni, "Qwen3OmniMoeProcessor")}


@pytest.fixture(scope="module", params=list(PLUGINS))
def session(request, probe_cache):
    return Session(PLUGINS[request.param][0].load("tiny"))


@pytest.fixture(scope="module")
def omni3(probe_cache):
    return Session(Qwen3Omni.load("tiny"))


@pytest.fixture
def real_processor(monkeypatch):
    """The family's real processor class over the tiny checkpoint's parts, without image and video processors."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))

    def build(plugin):
        cls = getattr(transformers, PLUGINS[plugin.name][1])
        ours = plugin.processor
        return cls(image_processor=None, video_processor=None, feature_extractor=ours.feature_extractor,
                   tokenizer=ours.tokenizer, chat_template=ours.chat_template)

    return build


def clips():
    return [Stimulus("long", audio=tone(440, 1.3), sample_rate=SR, prompt="What is this?"),
            Stimulus("short", audio=tone(220, 0.5), sample_rate=SR, prompt="Describe the sound in detail, please.")]


def conversation(item: Stimulus) -> list[dict]:
    content = [{"type": "audio", "audio": item.audio}, {"type": "text", "text": item.prompt}]
    return [{"role": "user", "content": content}]


def audio_span(prepared, b: int) -> list[int]:
    lm = prepared.rows[b]["lm"]
    s, e = lm.spans["audio"]
    return list(range(lm.offset + s, lm.offset + e))


def test_the_prompt_is_the_real_processors_chat_template_and_the_audio_span_its_audio_tokens(session,
                                                                                             real_processor):
    plugin, items = session.plugin, clips()
    processor = real_processor(plugin)
    ref = processor.apply_chat_template([conversation(it) for it in items], tokenize=True, return_dict=True,
                                        add_generation_prompt=True, return_tensors="pt",
                                        processor_kwargs={"padding": True})
    assert [plugin.render(it, plugin.default_prompt(it)) for it in items] == processor.apply_chat_template(
        [conversation(it) for it in items], add_generation_prompt=True, tokenize=False)
    prepared = session.prepare(items)
    for key in ("input_ids", "attention_mask", "feature_attention_mask"):
        assert torch.equal(prepared.inputs[key], ref[key]), key
    audio_id = plugin.tokenizer.convert_tokens_to_ids(plugin.audio_token)
    for b in range(len(items)):
        assert audio_span(prepared, b) == (ref["input_ids"][b] == audio_id).nonzero().flatten().tolist()
    ours, theirs = prepared.inputs["input_features"], ref["input_features"]
    if plugin.name == "qwen2.5-omni":  # features padded to the extractor's window: the same in any batch
        assert torch.equal(ours, theirs)
    else:  # padded to the longest clip, which changes the short clip's last frame: ours is the clip's own
        n = int(ref["feature_attention_mask"][1].sum())
        assert torch.equal(ours[:, :, :n - 1], theirs[:, :, :n - 1]) and not torch.equal(ours[1, :, n - 1],
                                                                                         theirs[1, :, n - 1])
        alone = processor.apply_chat_template([conversation(items[1])], tokenize=True, return_dict=True,
                                              add_generation_prompt=True, return_tensors="pt")
        assert torch.equal(ours[1, :, :n], alone["input_features"][0, :, :n])
        assert torch.equal(session.prepare(items[1:]).inputs["input_features"], alone["input_features"])


def test_an_assistant_prefix_is_continued_as_the_processor_renders_it(session, real_processor):
    plugin, item = session.plugin, clips()[0]
    conv = conversation(item) + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    assert plugin.render(item, Prompt(item.prompt, "It is a")) == real_processor(plugin).apply_chat_template(
        conv, continue_final_message=True, tokenize=False)


def test_the_packed_audio_tower_is_read_and_edited_clip_by_clip(session):
    """Each clip is its own span of the packed sequence: its mean, its positions, its audio tokens."""
    plugin, items = session.plugin, clips()
    tower = plugin.model.model.audio_tower
    seen = {}
    hooks = [tower.layers[1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("layer", out[0])),
             tower.register_forward_hook(lambda _m, _a, out: seen.__setitem__("tower", out.last_hidden_state))]
    try:
        reads = session.run(items, ["audio_encoder.1.out", "audio_encoder.projector"], ["mean", "all"])
    finally:
        for h in hooks:
            h.remove()
    prepared = session.prepare(items)
    frames = [p["audio_encoder"].length for p in prepared.rows]
    # 100 mel frames per second; the convolution halves them (Qwen2.5) or a chunk of 1 s gives 13 (Qwen3)
    assert frames == ([65, 25] if plugin.name == "qwen2.5-omni" else [17, 7])
    assert seen["layer"].shape[0] == sum(frames)
    starts = [0, frames[0]]
    for b, (start, n) in enumerate(zip(starts, frames)):
        torch.testing.assert_close(reads["audio_encoder.1.out@mean"][b], seen["layer"][start:start + n].mean(0))
        torch.testing.assert_close(reads["audio_encoder.1.out@all"][b], seen["layer"][start:start + n])
    # the projector gives what the LM receives: one row per audio token, clip after clip
    proj = reads["audio_encoder.projector@all"]
    assert [p.shape[0] for p in proj] == [len(audio_span(prepared, b)) for b in range(2)]
    torch.testing.assert_close(torch.cat(proj), seen["tower"])
    # an edit at each clip's last frame moves that frame only, in both clips of the packed row
    vector = torch.full((session.width("audio_encoder.0.out"),), 3.0)
    plain = session.run(items, ["audio_encoder.0.out"], ["all"])["audio_encoder.0.out@all"]
    edited = session.run(items, ["audio_encoder.0.out"], ["all"],
                         edits=[Edit("audio_encoder.0.out", "add", positions="last", value=vector)])
    for before, after in zip(plain, edited["audio_encoder.0.out@all"]):
        torch.testing.assert_close(after[-1] - before[-1], vector)
        torch.testing.assert_close(after[:-1], before[:-1])


def test_qwen3_router_logits_are_per_token_and_an_edit_reroutes_the_tokens(omni3):
    plugin, items = omni3.plugin, clips()
    block = plugin.model.model.language_model.layers[1].mlp
    seen = {}
    hooks = [block.gate.register_forward_hook(lambda _m, _a, out: seen.__setitem__("logits", out[0])),
             block.experts.register_forward_pre_hook(lambda _m, args: seen.__setitem__("chosen", args[1]))]
    try:
        reads = omni3.run(items, ["lm.1.moe_router", "lm.1.mlp"], ["all"])
        prepared = omni3.prepare(items)
        batch, length = prepared.inputs["input_ids"].shape
        logits = seen["logits"].view(batch, length, -1)
        assert omni3.width("lm.1.moe_router") == 4 and logits.shape[-1] == 4
        for b, row in enumerate(prepared.rows):
            lm = row["lm"]
            torch.testing.assert_close(reads["lm.1.moe_router@all"][b], logits[b, lm.offset:lm.offset + lm.length])
        # pushing expert 3's logit up makes every valid token take it, and changes the block's output
        edit = Edit("lm.1.moe_router", "set", positions="all", units=[3], value=50.0)
        rerouted = omni3.run(items, ["lm.1.mlp"], ["all"], edits=[edit])
        chosen = seen["chosen"].view(batch, length, -1)
    finally:
        for h in hooks:
            h.remove()
    for b, row in enumerate(prepared.rows):
        lm = row["lm"]
        assert (chosen[b, lm.offset:lm.offset + lm.length] == 3).any(-1).all()
        assert not torch.allclose(rerouted["lm.1.mlp@all"][b], reads["lm.1.mlp@all"][b])


def routed(router_logits: torch.Tensor, top_k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts and their renormalised routing weights, from its router logits (the router's rule)."""
    weights, experts = torch.softmax(router_logits, dim=-1).topk(top_k, dim=-1)
    return experts, weights / weights.sum(-1, keepdim=True)


def test_qwen3_expert_sites_are_each_experts_mlp_at_the_tokens_routed_to_it(omni3):
    plugin, items = omni3.plugin, clips()
    experts = plugin.model.model.language_model.layers[1].mlp.experts
    n = plugin.model.config.text_config.num_experts
    assert plugin.model.config.text_config.norm_topk_prob and experts.config._experts_implementation == "grouped_mm"
    sites = [f"lm.1.expert{e}_{part}" for e in range(n) for part in PARTS]
    reads = omni3.run(items, ["lm.1.mlp_norm", "lm.1.moe_router", "lm.1.mlp", *sites], ["all"])
    assert [omni3.width(f"lm.1.expert0_{part}") for part in PARTS] == [32, 32, 32, 64]
    for b in range(len(items)):
        x = reads["lm.1.mlp_norm@all"][b]  # the block's input
        chosen, weights = routed(reads["lm.1.moe_router@all"][b])
        mixed = torch.zeros_like(x)
        for e in range(n):
            mine = (chosen == e).any(-1)
            assert mine.any() and not mine.all()
            gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            act = experts.act_fn(gate) * up
            by_hand = {"gate": gate, "up": up, "act": act, "out": act @ experts.down_proj[e].T}
            for part, want in by_hand.items():
                got = reads[f"lm.1.expert{e}_{part}@all"][b]
                torch.testing.assert_close(got[mine], want[mine])
                assert not got[~mine].any(), f"expert{e}_{part} reads a token not routed to it"
            mixed += (weights * (chosen == e)).sum(-1, keepdim=True) * reads[f"lm.1.expert{e}_out@all"][b]
        torch.testing.assert_close(mixed, reads["lm.1.mlp@all"][b])  # the block: routing-weighted expert outputs


def test_qwen3_an_edit_of_one_experts_activation_changes_exactly_the_tokens_routed_to_it(omni3):
    plugin, items = omni3.plugin, clips()
    experts = plugin.model.model.language_model.layers[1].mlp.experts
    vector = torch.randn(omni3.width("lm.1.expert2_act"), generator=torch.Generator().manual_seed(0))
    plain = omni3.run(items, ["lm.1.moe_router", "lm.1.mlp", "lm.3.out"], ["all"])
    edited = omni3.run(items, ["lm.1.mlp", "lm.3.out"], ["all"],
                       edits=[Edit("lm.1.expert2_act", "add", positions="all", value=vector)])  # routed or not
    for b in range(len(items)):
        chosen, weights = routed(plain["lm.1.moe_router@all"][b])
        mine = (chosen == 2).any(-1)
        before, after = plain["lm.1.mlp@all"][b], edited["lm.1.mlp@all"][b]
        assert torch.equal(after[~mine], before[~mine])
        torch.testing.assert_close(after[mine] - before[mine], (weights * (chosen == 2)).sum(-1)[mine, None]
                                   * (experts.down_proj[2] @ vector))
        assert not torch.allclose(edited["lm.3.out@all"][b], plain["lm.3.out@all"][b])


def test_qwen3_expert_taps_leave_the_model_bit_for_bit_read_or_not(omni3):
    """Unread, the tapped model is the checkpoint's own model; reading every expert site changes no other value."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    plugin, items = omni3.plugin, clips()
    prepared = omni3.prepare(items)
    untapped = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(Qwen3Omni.source("tiny")).eval()
    with torch.no_grad():
        assert torch.equal(plugin.model(**prepared.inputs).logits, untapped(**prepared.inputs).logits)
    n = plugin.model.config.text_config.num_experts
    everything = [f"lm.*.expert{e}_{part}" for e in range(n) for part in PARTS]
    plain = omni3.run(items, ["lm.*.out"], ["all"])
    read = omni3.run(items, ["lm.*.out", *everything], ["all"])
    for key, rows in plain.items():
        assert all(torch.equal(a, b) for a, b in zip(rows, read[key])), key


def test_qwen3_expert_sites_at_decode_steps_equal_the_forward_pass_on_the_forced_prefix(omni3):
    """Armed taps run at every decode step (one new token each), routed to the expert or not."""
    items, sites = clips(), ["lm.1.expert0_act", "lm.2.expert3_out"]
    gen = omni3.generate(items, 3, sites, ["step:1", "step:2", "step:3"])
    prepared = omni3.prepare(items)
    hits = set()
    for t in (1, 2, 3):
        forced = omni3.plugin.teacher_forced(prepared, gen.prepared, gen.sequences[:, -3:][:, :t - 1])
        values = omni3.trace(forced, [it.id for it in items], omni3.reads(sites, ["last"]))
        for site in sites:
            torch.testing.assert_close(gen.reads[f"{site}@step:{t}"], values[f"{site}@last"])
            hits.update(gen.reads[f"{site}@step:{t}"].any(-1).tolist())
    assert hits == {True, False}  # some steps route to the expert, some do not


def test_probe_info_lists_every_experts_sites_with_their_widths(capsys):
    assert main(["info", "--model", "qwen3-omni", "--checkpoint", "tiny"]) == 0
    out = capsys.readouterr().out
    for part, width in zip(PARTS, (32, 32, 32, 64)):
        assert re.search(rf"lm\.<0\.\.3>\.expert<0\.\.3>_{part} +{width} +MoE expert i's", out), part
    assert main(["info", "--model", "qwen3-omni", "--checkpoint", "tiny", "--json"]) == 0
    lm = json.loads(capsys.readouterr().out)["stacks"]["lm"]["components"]
    assert {c: w for c, w in lm.items() if c.startswith("expert3_")} == {"expert3_gate": 32, "expert3_up": 32,
                                                                          "expert3_act": 32, "expert3_out": 64}


@pytest.mark.parametrize("name", list(PLUGINS))
def test_the_thinker_loads_from_a_full_omni_checkpoint(name, tmp_path, probe_cache):
    """Published checkpoints hold the thinker under ``thinker.`` beside the talker; the plugin loads the thinker."""
    import transformers
    from safetensors.torch import load_file, save_file

    cls = PLUGINS[name][0]
    tiny = cls.source("tiny")
    full_config = getattr(transformers, {"qwen2.5-omni": "Qwen2_5OmniConfig", "qwen3-omni": "Qwen3OmniMoeConfig"}[name])
    thinker = json.loads((tiny / "config.json").read_text())
    full_config(thinker_config=thinker).save_pretrained(tmp_path)
    weights = load_file(tiny / "model.safetensors")
    save_file({f"thinker.{k}": v for k, v in weights.items()} | {"talker.stand_in": torch.zeros(1)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    cls.processor_class.from_pretrained(tiny).save_pretrained(tmp_path)
    plugin, reference = cls.load(str(tmp_path)), cls.load("tiny")
    loaded = plugin.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.model.state_dict().items())
    assert plugin.describe() == reference.describe()


def test_a_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="Could not load qwen2.5-omni checkpoint"):
        Qwen25Omni.load(str(tmp_path))


@pytest.mark.parametrize("name", list(PLUGINS))
def test_the_cli_runs_the_logit_lens_and_clusters_on_the_audio_tower(name, capsys, tmp_path, gender_manifest):
    for analysis in ("logitlens:attribute=gender", "clusters:stack=audio_encoder,labels=[gender],space=both"):
        out = tmp_path / analysis.split(":")[0]
        code = main(["run", "--model", name, "--checkpoint", "tiny", "--analysis", analysis,
                     "--data", str(gender_manifest), "--out", str(out), "--batch-size", "5"])
        text = capsys.readouterr()
        assert code == 0, text.out + text.err
        assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "silhouette" in (tmp_path / "clusters" / "results.json").read_text()
    code = main(["list"])
    assert code == 0 and name in capsys.readouterr().out
