"""What Qwen3-Omni's per-expert taps cost (core/experts.py), as ratios against the untapped model or module.

- model: the tiny Qwen3-Omni thinker (4 MoE layers, 4 experts), a forward pass on two speech items and greedy
  ``generate`` of ``--new-tokens`` tokens, with nothing read: the plugin as it is (router and expert taps) vs the
  plugin without expert taps (router tap only: the baseline), both wrapped by a session's nnsight as in every run,
  and transformers' model alone, unwrapped, for scale. The tiny model does almost no arithmetic, so a fixed
  per-call cost shows at its largest here.
- module: one experts module alone, called as the block calls it, unarmed vs the class's own forward on the same
  module, and armed (one tap; every tap of every expert, i.e. reading all of them) on the same inputs; at the tiny
  shape and at Qwen3-Omni 30B-A3B's (128 experts, top 8, hidden 2048, expert width 768; bfloat16) for one token (a
  decode step) and 64 tokens.
- engine: ``Session.run`` reading one expert site (``lm.1.expert0_act``) vs one ordinary site of the same layer
  (``lm.1.mlp_norm``), at every position.

Every side runs once before timing; then ``--repeats`` rounds run every side once each, in a rotated order; medians
are reported with the ratio to the baseline, and the ratio of the fastest repeats beside it (on a shared machine
the steadier of the two). Times are this process's CPU time (``time.process_time``, one intra-op thread by
default), which other processes on a shared machine disturb far less than wall time. The unarmed goal is 1.0
within noise.

Run: ``python benchmarks/bench_experts.py [--repeats 30] [--new-tokens 8] [--threads 1] [--big]`` (``--big`` adds the 30B
shape: about 1.2 GB of expert weights).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import numpy as np
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.experts import PARTS, tap_experts
from lalm_probe.core.taps import TAP, arming
from lalm_probe.plugins.models.qwen3_omni import Qwen3Omni, tap_router

SR = 16000


class RouterOnly(Qwen3Omni):
    """The plugin without expert taps (as before them): the baseline."""

    def setup(self) -> None:
        AudioLM.setup(self)
        for layer in self.model.model.language_model.layers:
            tap_router(layer.mlp)


def timed(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) seconds per side over ``repeats`` rotated rounds (after one warm-up call each)."""
    names = list(sides)
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            start = time.process_time()
            sides[n]()
            times[n].append(time.process_time() - start)
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}


def report(title: str, results: dict[str, tuple[float, float]], baseline: str) -> None:
    print(f"\n{title}\n  {'':<40} {'median':>10}   ratio   {'fastest':>10}   ratio")
    base_med, base_min = results[baseline]
    for name, (med, fast) in results.items():
        print(f"  {name:<40} {med * 1e3:7.3f} ms  x{med / base_med:.3f}   {fast * 1e3:7.3f} ms  x{fast / base_min:.3f}")


def items() -> list[Stimulus]:
    t = np.arange(int(SR * 1.3)) / SR
    tones = [(0.3 * np.sin(2 * np.pi * f * t[:int(SR * s)])).astype(np.float32) for f, s in ((440, 1.3), (220, 0.5))]
    return [Stimulus(f"t{i}", audio=a, sample_rate=SR, prompt="Describe the sound.") for i, a in enumerate(tones)]


def bench_model(repeats: int, new_tokens: int) -> Session:
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    plain = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(Qwen3Omni.source("tiny")).eval()
    session, before = Session(Qwen3Omni.load("tiny")), Session(RouterOnly.load("tiny"))  # nnsight wraps in place
    ours, base = session.plugin.model, before.plugin.model
    inputs = session.prepare(items()).inputs
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, plain(**inputs).logits)
        assert torch.equal(ours.generate(**inputs, **kwargs), plain.generate(**inputs, **kwargs))
        report("model: tiny Qwen3-Omni forward (2 speech items), nothing read", timed({
            "plugin without expert taps": lambda: base(**inputs), "plugin with expert taps": lambda: ours(**inputs),
            "transformers alone, unwrapped": lambda: plain(**inputs),
        }, repeats), "plugin without expert taps")
        report(f"model: tiny Qwen3-Omni generate ({new_tokens} tokens), nothing read", timed({
            "plugin without expert taps": lambda: base.generate(**inputs, **kwargs),
            "plugin with expert taps": lambda: ours.generate(**inputs, **kwargs),
            "transformers alone, unwrapped": lambda: plain.generate(**inputs, **kwargs),
        }, max(3, repeats // 3)), "plugin without expert taps")
    return session


def bench_module(title: str, experts: int, top_k: int, hidden: int, width: int, tokens: int, dtype: torch.dtype,
                 repeats: int) -> None:
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextSparseMoeBlock

    config = Qwen3OmniMoeTextConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                                    num_experts_per_tok=top_k)
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks
    torch.manual_seed(0)
    with torch.device("meta"):
        block = Qwen3OmniMoeThinkerTextSparseMoeBlock(config)
    block = block.to_empty(device="cpu").to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tap_experts(block)
    module = block.experts
    x = torch.randn(1, tokens, hidden, dtype=dtype)
    _, weights, index = block.gate(x.view(-1, hidden))
    flat = x.view(-1, hidden)

    def call() -> torch.Tensor:  # as the block calls it: its pre-hook records (batch, time), then the experts
        for hook in block._forward_pre_hooks.values():
            hook(block, (x,))
        return module(flat, index, weights)

    probe = module.__dict__.pop("forward")  # the class's own forward on the same module: the baseline
    own = call
    sides: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        want = own()
        sides["own forward"] = own
        module.forward = probe

        def armed(paths: list[str]) -> Callable[[], object]:
            def run() -> torch.Tensor:
                with arming(block, paths):
                    return call()
            return run

        one = [f"experts.{TAP}.0.act"]
        every = [f"experts.{TAP}.{e}.{p}" for e in range(experts) for p in PARTS]
        assert torch.equal(call(), want) and torch.equal(armed(every)(), want)
        sides.update({"probe forward, unarmed": call, "armed: expert 0 act": armed(one),
                      f"armed: all {4 * experts} taps": armed(every)})
        report(title, timed(sides, repeats), "own forward")


def bench_engine(session: Session, repeats: int) -> None:
    batch = items()
    report("engine: Session.run, one site of layer 1 at every position", timed({
        "lm.1.mlp_norm": lambda: session.run(batch, ["lm.1.mlp_norm"], ["all"]),
        "lm.1.expert0_act": lambda: session.run(batch, ["lm.1.expert0_act"], ["all"]),
    }, repeats), "lm.1.mlp_norm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads")
    parser.add_argument("--big", action="store_true", help="add the Qwen3-Omni 30B-A3B expert shape (1.2 GB)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    session = bench_model(args.repeats, args.new_tokens)
    bench_module("module: tiny shape (4 experts, top 2, 64 -> 32), 54 tokens, float32", 4, 2, 64, 32, 54,
                 torch.float32, args.repeats * 10)
    if args.big:
        for tokens in (1, 64):
            bench_module(f"module: Qwen3-Omni 30B-A3B shape (128 experts, top 8, 2048 -> 768), {tokens} token(s), "
                         "bfloat16", 128, 8, 2048, 768, tokens, torch.bfloat16, max(5, args.repeats // 3))
    bench_engine(session, args.repeats)


if __name__ == "__main__":
    main()
