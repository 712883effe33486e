"""Collection: stream what a run needs from the model into stores, collecting only what is missing.

Every row carries a fingerprint of its item and prompt, so a store is reused across analyses (a second analysis,
or the same one with other options, collects only keys the store lacks) and a fixed manifest resumes the rows
already stored instead of starting over. Sites on a stack an item never reaches (a speech encoder for a text item)
are recorded as absent for it, not collected again. With ``step:``/``prefix:`` positions each batch is decoded
(greedily, or forcing a label's text) and read during generation; otherwise one forward pass per batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import torch

from .data import Dataset, Stimulus
from .edits import Edit
from .engine import Session
from .model import Prompt
from .outputs import OutputStore
from .plugin import Reads
from .steps import step_of
from .store import ActivationStore

PromptFn = Callable[[Stimulus], Prompt]


def row_fingerprint(item: Stimulus, prompt: Prompt) -> str:
    """What a stored row was computed from: the item (audio, text, labels) and the prompt it was shown with."""
    blob = json.dumps([item.fingerprint(), prompt.user, prompt.assistant_prefix])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprints(dataset: Dataset, prompt_fn: PromptFn) -> dict[str, str]:
    return {it.id: row_fingerprint(it, prompt_fn(it)) for it in dataset}


def _numpy(value: Any) -> Any:
    if isinstance(value, list):  # every position of each row: ragged
        return [v.float().cpu().numpy() for v in value]
    return value.float().cpu().numpy()


def collect(session: Session, dataset: Dataset, reads: Sequence[Reads], store: ActivationStore, *,
            batch_size: int = 8, edits: Sequence[Edit] = (), prompt_fn: PromptFn | None = None,
            force_target: str | None = None, shard: tuple[int, int] = (0, 1), shard_rows: int = 256,
            description: str = "Collecting") -> ActivationStore:
    """Collect every read for its items into ``store``, skipping rows it already holds for the same item and
    prompt. ``shard=(k, n)``: this process collects every n-th batch from the k-th (see :meth:`Session.batches`)."""
    prompt_fn = prompt_fn or session.plugin.default_prompt
    prints = fingerprints(dataset, prompt_fn)
    for read in reads:
        wanted = None if read.items is None else set(read.items)
        items = [it for it in dataset if wanted is None or it.id in wanted]
        planned = session.reads(read.sites, read.positions)
        keys = [f"{site}@{sel}" for site, sel in planned]
        todo_ids = set(store.missing(keys, {it.id: prints[it.id] for it in items}))
        todo = [it for it in items if it.id in todo_ids]
        steps = max((step_of(sel)[0] for _, sel in planned if step_of(sel)), default=0)
        for chunk, prepared in session.batches(todo, batch_size, prompt_fn, description, shard):
            ids = [it.id for it in chunk]
            reachable = session.reachable_reads(planned, prepared, ids)
            absent = [k for r, k in zip(planned, keys) if r not in reachable]
            if not reachable:  # none of the asked-for stacks is reached by these items (text, encoder sites)
                values: dict[str, Any] = {}
            elif steps:
                values = session.generate_batch(chunk, prepared, reachable, edits, steps, force_target).reads
            else:
                values = session.trace(prepared, ids, reachable, edits)
            store.add(ids, {k: _numpy(v) for k, v in values.items()}, [prints[i] for i in ids], absent)
            if store.buffered >= shard_rows:
                store.flush()
    store.mark_complete()
    return store


def write_outputs(session: Session, dataset: Dataset, store: OutputStore, max_new_tokens: int, *,
                  batch_size: int = 8, edits: Sequence[Edit] = (), prompt_fn: PromptFn | None = None,
                  description: str = "Generating") -> OutputStore:
    """The model's own output for every item (greedy, stopping at end of sequence), with edits applied."""
    done = store.stored_ids()
    todo = [it for it in dataset if it.id not in done]
    with torch.no_grad():
        for chunk, prepared in session.batches(todo, batch_size, prompt_fn, description):
            gen = session.generate_batch(chunk, prepared, [], edits, max_new_tokens, None, until_eos=True)
            store.add([{"id": it.id, **out} for it, out in zip(chunk, gen.outputs)])
    store.mark_complete([it.id for it in dataset])
    return store
