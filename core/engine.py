"""The session: a loaded model plugin plus the machinery to read and edit sites over a dataset.

It batches stimuli (the plugin pads and reports where each row's audio and text sit), plans one trace per batch
with every read and edit in execution order, reduces on the model's device, and streams rows to an
:class:`~lalm_probe.core.store.ActivationStore`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .data import Dataset, Stimulus, load_audio
from .errors import UserError
from .model import ModelPlugin, Prepared, Prompt
from .plugin import Edit
from .progress import progress_bar
from .sites import Reducer, Site, check_position, parse_sites
from .store import ActivationStore
from .tracing import Op, Tracer

PromptFn = Callable[[Stimulus], Prompt]


class Session:
    """A model plugin wrapped for tracing. Cheap to create once the plugin is loaded."""

    def __init__(self, plugin: ModelPlugin) -> None:
        self.plugin = plugin
        self.tracer = Tracer(plugin.model)
        self._order: dict[str, tuple[int, int]] = {}

    # ---- inputs -----------------------------------------------------------------------------------
    def prepare(self, items: Sequence[Stimulus], prompt_fn: PromptFn | None = None) -> Prepared:
        """Decode audio at the model's rate, build prompts, and let the plugin pad the batch."""
        prompt_fn = prompt_fn or self.plugin.default_prompt
        audio = [load_audio(it, self.plugin.sample_rate) if it.has_audio else None for it in items]
        prepared = self.plugin.prepare(items, audio, [prompt_fn(it) for it in items])
        device = self.plugin.device
        prepared.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prepared.inputs.items()}
        return prepared

    def batches(self, items: Sequence[Stimulus], batch_size: int, prompt_fn: PromptFn | None = None,
                description: str = "Collecting") -> Iterator[tuple[list[Stimulus], Prepared]]:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
        with progress_bar(description, total=len(items)) as advance:
            for start in range(0, len(items), batch_size):
                chunk = list(items[start:start + batch_size])
                yield chunk, self.prepare(chunk, prompt_fn)
                advance(len(chunk))

    # ---- planning ---------------------------------------------------------------------------------
    def sites(self, patterns: Sequence[str]) -> list[Site]:
        return parse_sites(patterns, self.plugin.resolved)

    def _orders(self, prepared: Prepared, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
        missing = [p for p in paths if p not in self._order]
        if missing:
            every = list(self._order) + missing
            self._order = self.tracer.execution_order(prepared.inputs, every)
        return self._order

    def _reducer(self, site: Site, selector: str, prepared: Prepared, ids: Sequence[str]) -> Callable:
        """A function from a site output to one value per row, built lazily once the time length is known."""
        rows = []
        for r, rid in zip(prepared.rows, ids):
            if site.stack not in r:
                raise UserError(f"Item '{rid}' does not pass through '{site.stack}' (e.g. no audio), "
                                f"so site '{site}' cannot be read for it.")
            rows.append(r[site.stack])
        batch_rows = [p.row if p.row is not None else b for b, p in enumerate(rows)]
        cache: dict[int, Reducer] = {}

        def reduce(out: torch.Tensor, state: dict) -> Any:
            if state.get("step", 0) > 0 and self.plugin.resolved[site.stack].spec.runs == "per_step":
                return out[:, -1]  # with a KV cache each later step sees only the new position
            out = out[batch_rows] if batch_rows != list(range(out.shape[0])) else out
            if out.shape[1] not in cache:
                cache[out.shape[1]] = Reducer(selector, rows, ids, out.shape[1])
            return cache[out.shape[1]](out)

        return reduce

    def plan(self, prepared: Prepared, ids: Sequence[str], reads: Sequence[tuple[Site, str]],
             edits: Sequence[Edit] = (), read_steps: Sequence[int] | None = None) -> list[Op]:
        """Turn reads and edits into ops ordered as the model executes them (edits before reads per module)."""
        stacks = self.plugin.resolved
        ops: list[Op] = []
        for site, sel in reads:
            fn = self._reducer(site, sel, prepared, ids)
            ops.append(Op(site.module_path(stacks), "read", lambda out, st, fn=fn: fn(out, st),
                          key=f"{site}@{sel}", steps=read_steps))
        for n, edit in enumerate(edits):
            ops.extend(self._edit_ops(edit, prepared, ids, n))
        order = self._orders(prepared, [op.module for op in ops])
        # Input edits happen when a module starts, outputs when it finishes; within one module's output,
        # edits come before reads so a read sees what the rest of the model sees.
        for op in ops:
            start, end = order[op.module]
            op.order = 2 * start if op.kind == "edit_input" else 2 * end + (op.kind == "read")
        return ops

    def _edit_ops(self, edit: Edit, prepared: Prepared, ids: Sequence[str], n: int) -> list[Op]:
        from .edits import edit_function

        (site,) = self.sites([edit.site])
        ops = []
        if edit.source:
            src_pattern, _, src_pos = edit.source.partition("@")
            (src,) = self.sites([src_pattern])
            fn = self._reducer(src, check_position(src_pos or "last"), prepared, ids)
            ops.append(Op(src.module_path(self.plugin.resolved), "read", fn, key=f"__edit{n}_source",
                          steps=edit.steps))
        kind, fn = edit_function(edit, site, prepared, ids, self.plugin, source_key=f"__edit{n}_source")
        ops.append(Op(site.module_path(self.plugin.resolved), kind, fn, steps=edit.steps))
        return ops

    # ---- running ----------------------------------------------------------------------------------
    def run(self, items: Sequence[Stimulus], sites: Sequence[str], positions: Sequence[str] = ("last",),
            edits: Sequence[Edit] = (), prompt_fn: PromptFn | None = None) -> dict[str, Any]:
        """Read sites for a handful of items in one trace; values stay tensors (``all`` gives lists)."""
        prepared = self.prepare(items, prompt_fn)
        reads = [(s, check_position(p)) for s in self.sites(sites) for p in positions]
        ops = self.plan(prepared, [it.id for it in items], reads, edits)
        return self.tracer.run(prepared.inputs, ops)

    def collect(self, dataset: Dataset, sites: Sequence[str], positions: Sequence[str], store: ActivationStore,
                batch_size: int = 8, edits: Sequence[Edit] = (), prompt_fn: PromptFn | None = None,
                shard_rows: int = 256, description: str = "Collecting") -> ActivationStore:
        """Stream reduced activations for every item into ``store``, skipping ids it already holds."""
        if "all" in positions:
            raise UserError("Position 'all' has a different length per item and cannot be stored; "
                            "use last, mean, a span or token:<i>.")
        reads = [(s, check_position(p)) for s in self.sites(sites) for p in positions]
        done = store.stored_ids()
        todo = [it for it in dataset if it.id not in done]
        for chunk, prepared in self.batches(todo, batch_size, prompt_fn, description):
            ids = [it.id for it in chunk]
            values = self.tracer.run(prepared.inputs, self.plan(prepared, ids, reads, edits))
            store.add(ids, {k: v.float().cpu().numpy() for k, v in values.items()})
            if store.buffered >= shard_rows:
                store.flush()
        store.mark_complete()
        return store

    def generate(self, items: Sequence[Stimulus], max_new_tokens: int, sites: Sequence[str] = (),
                 positions: Sequence[str] = ("last",), edits: Sequence[Edit] = (),
                 prompt_fn: PromptFn | None = None, **gen_kwargs: Any) -> tuple[dict[str, list], Any]:
        """Generate exactly ``max_new_tokens`` tokens, reading sites at every step and applying step-scoped edits.

        Reads of per-step stacks return one entry per step (step 0 = the prompt pass); encoder stacks run once.
        """
        prepared = self.prepare(items, prompt_fn)
        ids = [it.id for it in items]
        reads = [(s, check_position(p)) for s in self.sites(sites) for p in positions]
        ops = self.plan(prepared, ids, reads, edits)
        once = {op.module for op in ops if self._stack_of(op.module) == "once"}
        kwargs = {**self.plugin.generate_kwargs(), **gen_kwargs}
        return self.tracer.generate(prepared.inputs, ops, max_new_tokens, once, **kwargs)

    def _stack_of(self, module: str) -> str:
        for st in self.plugin.resolved.values():
            if module.startswith(st.layers_path + ".") or module in st.extras.values():
                return st.spec.runs
        return "once"

    # ---- lens -------------------------------------------------------------------------------------
    def lens(self, hidden: torch.Tensor | np.ndarray, stack: str | None = None, norm: bool = True) -> torch.Tensor:
        """Project hidden states to vocabulary logits: ``unembed(norm(h))`` or ``unembed(h)``."""
        name = stack or self.plugin.lens_stack
        if name is None or name not in self.plugin.resolved:
            raise UserError(f"Model '{self.plugin.name}' declares no stack with an unembedding for the logit lens.")
        st = self.plugin.resolved[name]
        if st.unembed is None:
            raise UserError(f"Stack '{name}' has no unembedding; the logit lens needs one.")
        from .model import get_module

        model = self.plugin.model
        h = torch.as_tensor(hidden).to(self.plugin.device, dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            if norm and st.final_norm is not None:
                h = get_module(model, st.final_norm)(h)
            return get_module(model, st.unembed)(h).float()
