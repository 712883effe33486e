"""Per-expert taps of a fused experts module (core/experts.py), on transformers' own Qwen3-Omni MoE block with random
weights, for each experts implementation the probe forward writes out: bit for bit the module's own output, taps
that hold each expert's MLP at its routed tokens and zeros elsewhere, and edits that reach exactly those tokens.
Through the engine on the tiny Qwen3-Omni: tests/plugins/models/test_qwen_omni.py."""

from __future__ import annotations

import copy

import pytest
import torch
from lalm_probe.core.errors import PluginError, UserError
from lalm_probe.core.experts import PARTS, expert_components, tap_experts
from lalm_probe.core.taps import TAP, arming
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
E, H, I, K = 6, 16, 8, 2  # experts, hidden, intermediate, experts per token
B, T = 2, 7


def block(impl: str, dtype: torch.dtype = torch.float32, tapped: bool = True) -> tuple[torch.nn.Module,
                                                                                        torch.nn.Module]:
    """A (tapped) MoE block and an untapped copy of its experts module."""
    config = Qwen3OmniMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    config._experts_implementation = impl
    torch.manual_seed(0)
    moe = Qwen3OmniMoeThinkerTextSparseMoeBlock(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    moe = moe.to(dtype)
    plain = copy.deepcopy(moe.experts)
    if tapped:
        tap_experts(moe)
    return moe, plain


def routing(impl: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states of B*T tokens, their experts and weights. Expert 5 takes no token; under eager (which skips
    the index E, a slot routed to no expert) token 3 is routed to no expert at all and token 4 to one."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B * T, H, generator=g).to(dtype)
    index = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(B * T)])
    if impl == "eager":
        index[3] = E
        index[4, 1] = E
    weights = torch.rand(B * T, K, generator=g).to(dtype)
    return hidden, index, weights


def sites(moe: torch.nn.Module, parts=PARTS, experts=range(E)) -> list[str]:
    return [f"experts.{TAP}.{e}.{part}" for e in experts for part in parts]


def call(moe: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts module as the block calls it (the block's pre-hook records (batch, time) first)."""
    for hook in moe._forward_pre_hooks.values():
        hook(moe, (hidden.view(B, T, H),))
    return moe.experts(hidden, index, weights)


def by_hand(moe: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
    """Expert e's parts at every token from the weights, zero where the token is not routed to it."""
    routed = (index == e).any(-1, keepdim=True)
    gate, up = (hidden.float() @ moe.experts.gate_up_proj[e].float().T).chunk(2, dim=-1)
    act = moe.experts.act_fn(gate) * up
    parts = {"gate": gate, "up": up, "act": act, "out": act @ moe.experts.down_proj[e].float().T}
    return {k: torch.where(routed, v, torch.zeros_like(v)).view(B, T, -1) for k, v in parts.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_the_probe_forward_is_the_modules_own_bit_for_bit_read_or_not(impl, dtype):
    moe, plain = block(impl, dtype)
    hidden, index, weights = routing(impl, dtype)
    want = plain(hidden, index, weights)
    assert torch.equal(call(moe, hidden, index, weights), want)  # nothing armed: the module's own forward
    for parts in [PARTS, *[(part,) for part in PARTS]]:  # taps armed, none edits: the written-out implementation
        with arming(moe, sites(moe, parts)):
            assert torch.equal(call(moe, hidden, index, weights), want), parts
    if impl == "eager":
        assert torch.equal(want[3], torch.zeros(H, dtype=dtype))  # routed to no expert


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_each_expert_tap_holds_its_mlp_at_its_routed_tokens_and_zeros_elsewhere(impl):
    moe, _ = block(impl)
    hidden, index, weights = routing(impl)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [getattr(getattr(moe.experts, TAP)[e], part).register_forward_hook(
        lambda _m, _a, out, key=(e, part): seen.__setitem__(key, out)) for e in range(E) for part in PARTS]
    try:
        with arming(moe, sites(moe)):
            call(moe, hidden, index, weights)
    finally:
        for h in hooks:
            h.remove()
    for e in range(E):
        for part, want in by_hand(moe, hidden, index, e).items():
            torch.testing.assert_close(seen[(e, part)], want, msg=f"expert {e} {part}")
    assert not seen[(5, "act")].any()  # expert 5 took no token: its taps still run, on zeros


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_edit_of_one_expert_changes_exactly_the_tokens_routed_to_it(impl, part):
    moe, _ = block(impl)
    hidden, index, weights = routing(impl)
    plain = call(moe, hidden, index, weights)
    e = 2
    tap = getattr(getattr(moe.experts, TAP)[e], part)
    vector = torch.randn(tap.units, generator=torch.Generator().manual_seed(3))
    handle = tap.register_forward_hook(lambda _m, _a, out: out + vector)  # at every position, routed or not
    try:
        with arming(moe, sites(moe, [part], [e])):
            edited = call(moe, hidden, index, weights)
    finally:
        handle.remove()
    slot = index == e
    routed = slot.any(-1)
    assert routed.any() and not routed.all()
    assert torch.equal(edited[~routed], plain[~routed])
    if part in ("act", "out"):  # linear from here on: the change is the routing weight times the edit's image
        image = vector if part == "out" else moe.experts.down_proj[e] @ vector
        torch.testing.assert_close(edited[routed] - plain[routed], (weights * slot).sum(-1)[routed, None] * image)
    else:
        assert (edited[routed] != plain[routed]).any(-1).all()


def test_unarmed_taps_are_never_called_and_arming_nests():
    moe, _ = block("grouped_mm")
    hidden, index, weights = routing("grouped_mm")
    calls = []
    tap = getattr(moe.experts, TAP)[1].act
    handle = tap.register_forward_hook(lambda *_: calls.append(1))
    try:
        call(moe, hidden, index, weights)
        assert calls == [] and getattr(moe.experts, TAP).armed == 0
        with arming(moe, sites(moe, ["act"], [1])):
            with arming(moe, sites(moe, ["act"], [1])):
                assert tap.armed == 2
            call(moe, hidden, index, weights)
        assert calls == [1] and tap.armed == 0 and getattr(moe.experts, TAP).armed == 0
    finally:
        handle.remove()


def test_a_deep_copy_has_taps_of_its_own():
    moe, _ = block("eager")
    hidden, index, weights = routing("eager")
    twin = copy.deepcopy(moe)
    seen = {}
    handle = getattr(twin.experts, TAP)[0].act.register_forward_hook(lambda _m, _a, out: seen.setdefault("x", out))
    try:
        with arming(twin, sites(twin, ["act"], [0])):
            want = moe.experts(hidden, index, weights)
            assert torch.equal(call(twin, hidden, index, weights), want)
    finally:
        handle.remove()
    assert seen["x"].shape == (B, T, I) and getattr(moe.experts, TAP).batch_time is None


def test_an_unsupported_implementation_or_layout_is_one_clear_sentence():
    moe, _ = block("grouped_mm")
    hidden, index, weights = routing("grouped_mm")
    moe.experts.config._experts_implementation = "deepgemm"
    with arming(moe, sites(moe, ["act"], [0])), pytest.raises(UserError, match="experts run 'deepgemm'"):
        call(moe, hidden, index, weights)
    other, _ = block("eager", tapped=False)
    other.experts.has_bias = True
    with pytest.raises(PluginError, match="need has_bias=False"):
        tap_experts(other)


def test_expert_components_name_every_experts_taps():
    comps = expert_components(3)
    assert list(comps)[:5] == ["expert0_gate", "expert0_up", "expert0_act", "expert0_out", "expert1_gate"]
    assert comps["expert2_out"].path == f"mlp.experts.{TAP}.2.out" and len(comps) == 12
