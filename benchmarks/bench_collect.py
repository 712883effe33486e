"""Collecting every LM layer at the last position, as a ratio against a plain PyTorch forward-hook loop.

Both sides use the same model, the same prepared batches and the same batch size, in the same process, and
alternate so machine noise hits both. Run: ``python benchmarks/bench_collect.py [--items 300] [--batch-size 8] [--width 1024]`` (``--width``: the same
tiny model with a wider random LM, where a forward pass is long enough for the fixed per-batch work to show its
real share).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from lalm_probe.core.collect import collect
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.plugin import Reads
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.models.qwen2audio import Qwen2Audio
from transformers import Qwen2AudioForConditionalGeneration


def plain_hook_loop(session: Session, batches: list) -> float:
    """Forward hooks on every LM layer, last position gathered from the mask, copied to numpy."""
    layers = session.plugin.model.model.language_model.layers
    start = time.perf_counter()
    for prepared in batches:
        grabbed = []
        mask = prepared.inputs["attention_mask"]
        last = torch.full((mask.shape[0],), mask.shape[1] - 1)  # left padding: the last column is every row's last
        handles = [layer.register_forward_hook(lambda m, i, o: grabbed.append(o[torch.arange(len(last)), last]))
                   for layer in layers]
        with torch.no_grad():
            session.plugin.model(**prepared.inputs)
        for h in handles:
            h.remove()
        _ = [g.float().cpu().numpy() for g in grabbed]
    return time.perf_counter() - start


def probe_collect(session: Session, dataset: Dataset, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore(tmp, {"bench": 1})
        start = time.perf_counter()
        collect(session, dataset, [Reads(["lm.*.out"], ["last"])], store, batch_size=batch_size)
        return time.perf_counter() - start


def wider(folder: str, width: int) -> str:
    """The tiny Qwen2-Audio's processor with a randomly initialised LM ``width`` wide (same 8 layers), saved to
    ``folder``: a model whose forward pass costs what real ones do relative to the fixed per-batch work."""
    tiny = Qwen2Audio.load("tiny")
    cfg = tiny.model.config
    cfg.text_config.hidden_size, cfg.text_config.intermediate_size = width, 4 * width
    cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads = width // 64, width // 128
    cfg.text_config.head_dim = 64
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(cfg).eval().save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=None, help="LM width of a wider random model (default: the tiny)")
    args = ap.parse_args()
    folder = tempfile.TemporaryDirectory()
    session = Session(Qwen2Audio.load(wider(folder.name, args.width) if args.width else "tiny"))
    rng = np.random.default_rng(0)
    dataset = Dataset([Stimulus(f"b{i}", audio=(0.1 * rng.standard_normal(int(16000 * rng.uniform(0.3, 1.5))))
                                .astype(np.float32), sample_rate=16000, prompt="What is this?")
                       for i in range(args.items)])
    # Input preparation (audio decoding, features) is identical for both and excluded from both timings.
    batches = [session.prepare(dataset.items[i:i + args.batch_size]) for i in range(0, len(dataset), args.batch_size)]

    def timed_probe() -> float:
        it = iter(batches)
        session.prepare = lambda items, prompt_fn=None: next(it)  # noqa: ARG005
        return probe_collect(session, dataset, args.batch_size)

    timed_probe(), plain_hook_loop(session, batches)  # warm-up
    probe, plain = [], []
    for _ in range(args.repeats):
        probe.append(timed_probe())
        plain.append(plain_hook_loop(session, batches))
    p, b = float(np.median(probe)), float(np.median(plain))
    lm = session.plugin.resolved["lm"]
    print(f"items={args.items} batch={args.batch_size} layers={lm.num_layers} width={session.width('lm.0.out')}")
    print(f"plain hooks: {b:.3f} s   lalm-probe collect (store on disk): {p:.3f} s   ratio: {p / b:.3f}")


if __name__ == "__main__":
    main()
