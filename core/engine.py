"""The session: a loaded model plugin plus the machinery to read and edit sites over a dataset.

It batches stimuli (the plugin pads and reports where each row's audio and text sit), plans one trace per batch
with every read and edit in execution order, reduces on the model's device, and streams rows to an
:class:`~lalm_probe.core.store.ActivationStore` (see :mod:`.collect`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .audio import load_audio
from .data import Stimulus
from .edits import Edit, edit_function
from .errors import UserError
from .model import ModelPlugin, Prepared, Prompt
from .progress import progress_bar
from .sites import Reducer, Site, check_position, parse_sites
from .steps import edit_steps, read_steps, step_of
from .tracing import Op, Tracer
from .view import ModelView

PromptFn = Callable[[Stimulus], Prompt]


@dataclass
class Generation:
    """What one generated batch gave: reads (``site@position`` -> one row per item), token ids, decoded outputs."""

    reads: dict[str, torch.Tensor]
    sequences: torch.Tensor
    outputs: list[dict[str, Any]]
    prepared: Prepared  # the batch as generate took it (its decoder prompt, for teacher forcing)


def _first_row(prepared: Prepared) -> dict[str, Any]:
    """The inputs cut to the first row when every tensor is batched on dim 0: which module runs when does not
    depend on the batch size, and one row costs 1/B of the forward pass that records it."""
    n = len(prepared.rows)
    tensors = [v for v in prepared.inputs.values() if isinstance(v, torch.Tensor)]
    if n < 2 or not tensors or any(v.ndim == 0 or v.shape[0] != n for v in tensors):
        return prepared.inputs
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}


class ForcePrefix(LogitsProcessor):
    """Makes greedy decoding emit given tokens first, so activations match teacher forcing on that prefix."""

    def __init__(self, targets: Sequence[Sequence[int]]) -> None:
        self.targets = targets
        self.calls = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k, self.calls = self.calls, self.calls + 1
        scores = scores.clone()
        for b, target in enumerate(self.targets):
            if k < len(target):
                scores[b] = float("-inf")
                scores[b, target[k]] = 0.0
        return scores


class Session:
    """A model plugin wrapped for tracing. Cheap to create once the plugin is loaded."""

    def __init__(self, plugin: ModelPlugin) -> None:
        self.plugin = plugin
        self.tracer = Tracer(plugin.model)
        self._orders_by_inputs: dict[frozenset, dict[str, tuple[int, int]]] = {}

    # ---- inputs -----------------------------------------------------------------------------------
    def prepare(self, items: Sequence[Stimulus], prompt_fn: PromptFn | None = None) -> Prepared:
        """Decode audio at the model's rate, build prompts, and let the plugin pad the batch."""
        prompt_fn = prompt_fn or self.plugin.default_prompt
        audio = [load_audio(it, self.plugin.sample_rate) if it.has_audio else None for it in items]
        limit = self.plugin.max_seconds()
        for it, clip in zip(items, audio):
            if limit is not None and clip is not None and len(clip) > limit * self.plugin.sample_rate + 1:
                raise UserError(f"Item '{it.id}' lasts {len(clip) / self.plugin.sample_rate:.1f} s; "
                                f"'{self.plugin.name}' reads at most {limit:g} s of audio and would cut the rest, so "
                                "split longer recordings first.")
        prepared = self.plugin.prepare(items, audio, [prompt_fn(it) for it in items])
        prepared.inputs = self._to_device(prepared.inputs)
        if prepared.generate_inputs is not None:
            prepared.generate_inputs = self._to_device(prepared.generate_inputs)
        return prepared

    def batches(self, items: Sequence[Stimulus], batch_size: int, prompt_fn: PromptFn | None = None,
                description: str = "Collecting", shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[list[Stimulus], Prepared]]:
        """Batches of items that share the plugin's batch key (speech and text never mix), in first-seen order.

        ``shard=(k, n)``: only every n-th batch from the k-th, so n processes split the batches of one run between
        them and each batch is exactly the one a single process would have made.
        """
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
        groups: dict[Any, list[Stimulus]] = {}
        for it in items:
            groups.setdefault(self.plugin.batch_key(it), []).append(it)
        chunks = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
        mine = [c for j, c in enumerate(chunks) if j % shard[1] == shard[0]]
        with progress_bar(description, total=sum(map(len, mine))) as advance:
            for chunk in mine:
                yield chunk, self.prepare(chunk, prompt_fn)
                advance(len(chunk))

    # ---- planning ---------------------------------------------------------------------------------
    def sites(self, patterns: Sequence[str]) -> list[Site]:
        return parse_sites(patterns, self.plugin.resolved)

    def reads(self, sites: Sequence[str], positions: Sequence[str]) -> list[tuple[Site, str]]:
        """Every site with every position, except decode-step positions on stacks that run once (an encoder
        is read with ``mean`` or ``last`` while the decoder is read at ``step:t`` in the same request)."""
        parsed = self.sites(sites)
        out = []
        for sel in map(check_position, positions):
            per_step = [s for s in parsed if step_of(sel) is None
                        or self.plugin.resolved[s.stack].spec.runs == "per_step"]
            if parsed and not per_step:
                raise UserError(f"Position '{sel}' needs a stack that runs at every decode step, but the sites "
                                f"{list(sites)} run once per input (read them with last, mean or a span).")
            out += [(s, sel) for s in per_step]
        return sorted(out, key=lambda r: parsed.index(r[0]))

    def _orders(self, prepared: Prepared, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Module execution order, recorded once per kind of input (speech and text take different paths)."""
        kind = frozenset(k for k, v in prepared.inputs.items() if v is not None)
        order = self._orders_by_inputs.get(kind, {})
        missing = [p for p in paths if p not in order]
        if missing:
            order = self.tracer.execution_order(_first_row(prepared), list(order) + missing)
            self._orders_by_inputs[kind] = order
        return order

    def _rows(self, site: Site, prepared: Prepared, ids: Sequence[str]) -> list[Any]:
        """Each row's positions on the time axis of ``site`` (its stack's, or an extra's own)."""
        key = self.plugin.resolved[site.stack].rows_key(site.component)
        rows = []
        for r, rid in zip(prepared.rows, ids):
            if key not in r:
                raise UserError(f"Item '{rid}' does not pass through '{site.stack}' (e.g. no audio), "
                                f"so site '{site}' cannot be read for it.")
            rows.append(r[key])
        return rows

    def _reducer(self, site: Site, selector: str, prepared: Prepared, ids: Sequence[str]) -> Callable:
        """A function from a site output to one value per row, built lazily once the time length is known.

        For ``step:<t>`` / ``prefix:<t>`` it is called at every decode step up to t: step 1 sees the whole prompt
        (padded), later steps only the new position; ``prefix`` keeps a running sum over valid positions.
        """
        rows = self._rows(site, prepared, ids)
        batch_rows = [p.row if p.row is not None else b for b, p in enumerate(rows)]
        step = step_of(selector)
        if step is not None and self.plugin.resolved[site.stack].spec.runs != "per_step":
            raise UserError(f"Position '{selector}' needs a stack that runs at every decode step; "
                            f"'{site.stack}' runs once per input (read it with last, mean or a span).")
        first = ("mean" if step[1] else "last") if step else selector
        cache: dict[int, Reducer] = {}
        running: dict[str, Any] = {}

        def reduce(out: torch.Tensor, state: dict) -> Any:
            now = state.get("step", 1)
            if now > 1:  # with a KV cache each later step computes only the new position
                new = out[:, -1]
                if step is None or not step[1]:
                    return new
                running["sum"] = running["sum"] + new.float()
                running["count"] = running["count"] + 1
                return (running["sum"] / running["count"][:, None]).to(out.dtype)
            out = out[batch_rows] if batch_rows != list(range(out.shape[0])) else out
            if out.shape[1] not in cache:
                cache[out.shape[1]] = Reducer(first, rows, ids, out.shape[1])
            value = cache[out.shape[1]](out)
            if step is not None and step[1]:
                count = torch.tensor([float(p.length) for p in rows], device=out.device)
                running.update(sum=value.float() * count[:, None], count=count)
            return value

        return reduce

    def plan(self, prepared: Prepared, ids: Sequence[str], reads: Sequence[tuple[Site, str]],
             edits: Sequence[Edit] = (), forward: Prepared | None = None) -> list[Op]:
        """Turn reads and edits into ops ordered as the model executes them (edits before reads per module).

        The steps each op runs at during generation come from :mod:`.steps`. ``forward``: the batch as a plain
        forward pass takes it, when ``prepared`` is for generate.
        """
        ops: list[Op] = []
        for site, sel in reads:
            reduce = self._reducer(site, sel, prepared, ids)
            ops.append(self._op(site, "read", reduce, read_steps(sel, self._once(site)),
                                key=f"{site}@{sel}"))
        for n, edit in enumerate(edits):
            ops.extend(self._edit_ops(edit, prepared, ids, n))
        order = self._orders(forward or prepared, [op.module for op in ops])
        # Ops on inputs act when a module starts, on outputs when it finishes; at one point edits come before reads,
        # so a read sees what the rest of the model sees.
        for op in ops:
            start, end = order[op.module]
            op.order = (start if op.at_start else end, 1 if op.kind == "read" else 0)
        return ops

    def _once(self, site: Site) -> bool:
        return self.plugin.resolved[site.stack].spec.runs != "per_step"

    def _op(self, site: Site, kind: str, fn: Callable, steps: Any, key: str | None = None) -> Op:
        stack = self.plugin.resolved[site.stack]
        return Op(site.module_path(self.plugin.resolved), kind, fn, key=key, steps=steps, io=stack.io(site.component))

    def _edit_ops(self, edit: Edit, prepared: Prepared, ids: Sequence[str], n: int) -> list[Op]:
        (site,) = self.sites([edit.site])
        if not self.reachable_reads([(site, "last")], prepared, ids):
            return []  # no row runs this module (a speech encoder for text items): the edit has nothing to change
        steps = edit_steps(edit.steps, self._once(site))
        ops = []
        if edit.source:
            src_pattern, _, src_pos = edit.source.partition("@")
            (src,) = self.sites([src_pattern])
            fn = self._reducer(src, check_position(src_pos or "last"), prepared, ids)
            ops.append(self._op(src, "read", fn, edit_steps(edit.steps, self._once(src)), key=f"__edit{n}_source"))
        kind, fn = edit_function(edit, self._rows(site, prepared, ids), ids, source_key=f"__edit{n}_source")
        ops.append(self._op(site, kind, fn, steps))
        return ops

    def width(self, site: str) -> int:
        """Units of a site (``lm.3.mlp_act``): what an intervention's vector must match."""
        return self.plugin.width(site)

    # ---- running ----------------------------------------------------------------------------------
    def run(self, items: Sequence[Stimulus], sites: Sequence[str], positions: Sequence[str] = ("last",),
            edits: Sequence[Edit] = (), prompt_fn: PromptFn | None = None) -> dict[str, Any]:
        """Read sites for a handful of items in one trace; values stay tensors (``all`` gives lists)."""
        prepared = self.prepare(items, prompt_fn)
        return self.trace(prepared, [it.id for it in items], self.reads(sites, positions), edits)

    def trace(self, prepared: Prepared, ids: Sequence[str], reads: Sequence[tuple[Site, str]],
              edits: Sequence[Edit] = ()) -> dict[str, Any]:
        """One forward pass over a prepared batch: the reads (``site@position`` -> values), edits applied."""
        return self.tracer.run(prepared.inputs, self.plan(prepared, ids, reads, edits))

    def reachable_reads(self, reads: Sequence[tuple[Site, str]], prepared: Prepared,
                     ids: Sequence[str]) -> list[tuple[Site, str]]:
        """Drop reads (or edits) of stacks no row of this batch passes through; a stack only some rows reach is an
        error."""
        out = []
        for site, sel in reads:
            key = self.plugin.resolved[site.stack].rows_key(site.component)
            have = [key in r for r in prepared.rows]
            if all(have):
                out.append((site, sel))
            elif any(have):
                rid = ids[have.index(False)]
                raise UserError(f"Item '{rid}' does not pass through '{site.stack}' but others in its batch do; "
                                f"the model plugin's batch_key must keep them apart.")
        return out

    def generate(self, items: Sequence[Stimulus], max_new_tokens: int, sites: Sequence[str] = (),
                 positions: Sequence[str] = ("last",), edits: Sequence[Edit] = (),
                 prompt_fn: PromptFn | None = None, force_target: str | None = None,
                 **gen_kwargs: Any) -> "Generation":
        """Generate exactly ``max_new_tokens`` tokens for one batch, reading sites and applying step-scoped edits.

        Plain positions are read at step 1 (the prompt pass); ``step:t``/``prefix:t`` at decode step t.
        """
        if len({self.plugin.batch_key(it) for it in items}) > 1:
            raise UserError("generate takes one batch: items must share their modality (use Session.batches).")
        reads = self.reads(sites, positions)
        prepared = self.prepare(items, prompt_fn)
        return self.generate_batch(items, prepared, reads, edits, max_new_tokens, force_target, **gen_kwargs)

    def generate_batch(self, items: Sequence[Stimulus], prepared: Prepared, reads: Sequence[tuple[Site, str]],
                       edits: Sequence[Edit], max_new_tokens: int, force_target: str | None, until_eos: bool = False,
                       **gen_kwargs: Any) -> "Generation":
        """Generate for a prepared batch (see :meth:`generate`); ``until_eos`` lets rows stop at end of sequence."""
        ids = [it.id for it in items]
        steps = max((step_of(sel)[0] for _, sel in reads if step_of(sel)), default=1)
        if max_new_tokens < steps:
            raise UserError(f"Reading decode step {steps} needs at least {steps} new tokens, not {max_new_tokens}.")
        first = [e for e in edits if e.steps is None or 1 in e.steps]
        if first and self.plugin.decides_before_generating(prepared):
            gen = self.plugin.generation_inputs(prepared, self._last_logits(prepared, ids, first))
        else:
            gen = self.plugin.generation_inputs(prepared)
        gen.inputs = self._to_device(gen.inputs)
        room = self.plugin.room(gen)
        if room is not None and max_new_tokens > room:
            if not until_eos:
                raise UserError(f"'{self.plugin.name}' can generate at most {room} tokens after this prompt; "
                                f"{max_new_tokens} were asked for.")
            max_new_tokens = room  # "up to N tokens": the model's own limit caps it
        ops = self.plan(gen, ids, reads, edits, forward=prepared)
        kwargs = {**self.plugin.generate_kwargs(), **gen_kwargs}
        if force_target:
            kwargs["logits_processor"] = LogitsProcessorList([ForcePrefix(self._targets(items, force_target, steps))])
        values, result = self.tracer.generate(gen.inputs, ops, max_new_tokens, until_eos, **kwargs)
        sequences = getattr(result, "sequences", result)
        return Generation(values, sequences, self.plugin.decode_outputs(sequences, gen), gen)

    def _last_logits(self, prepared: Prepared, ids: Sequence[str], edits: Sequence[Edit]) -> torch.Tensor:
        """The model's logits at the forward prompt's last position with ``edits`` applied: the lens of the lens
        stack's last layer (``unembed(norm(h))``, which is the model's own head)."""
        stack = self.plugin.lens_stack
        site = f"{stack}.{self.plugin.resolved[stack].num_layers - 1}.out"
        (hidden,) = self.trace(prepared, ids, self.reads([site], ["last"]), edits).values()
        return self.lens(hidden, stack)

    def _targets(self, items: Sequence[Stimulus], key: str, steps: int) -> list[list[int]]:
        """Token ids of each item's target text; step t needs t-1 forced tokens before it."""
        out = []
        for it in items:
            if key not in it.labels:
                raise UserError(f"Item '{it.id}' has no label '{key}' to force as the decoded target.")
            ids = self.plugin.target_ids(str(it.labels[key]))
            if len(ids) < steps - 1:
                raise UserError(f"Item '{it.id}': its target '{key}' has {len(ids)} tokens, but reading decode "
                                f"step {steps} needs a forced prefix of {steps - 1}.")
            out.append(ids)
        return out

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = self.plugin.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    # ---- what analyses and interventions see ------------------------------------------------------------
    @property
    def view(self) -> ModelView:
        """The read-only model view: stacks, widths, lens, tokenizer (no forward passes)."""
        return ModelView(self.plugin)

    def lens(self, hidden: torch.Tensor | np.ndarray, stack: str | None = None, norm: bool = True) -> torch.Tensor:
        """Project hidden states to vocabulary logits: ``unembed(norm(h))`` or ``unembed(h)``."""
        return self.view.lens(hidden, stack, norm)
