"""Shared plumbing for the representation-geometry analyses (clusters, svcca, hub).

These analyses all read one vector per item per layer from the store, group items by their labels and pair
parallel items through ``semantic_id``. Keeping the stack/site resolution and the pairing rules in one place
means the three analyses agree on which layer is "layer 12" and on which item stands for a sentence.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError, unknown_name
from lalm_probe.core.view import ModelView

Layer = int | str  # a layer index, or the name of a stack-level extra (e.g. "adaptor")


def resolve_stack(model: ModelView, stack: str | None) -> str:
    """The requested stack, else the model's lens stack (its LM / text decoder), else its first stack."""
    resolved = model.resolved
    name = stack or model.lens_stack or next(iter(resolved), None)
    if name is None:
        raise UserError("The model declares no layer stacks to analyse.")
    if name not in resolved:
        raise unknown_name("stack", name, resolved)
    return name


def layer_sites(model: ModelView, stack: str, site: str) -> list[tuple[Layer, str]]:
    """``(layer, site)`` for every layer of ``stack`` at component ``site``, or one entry for an extra."""
    st = model.resolved[stack]
    if site in st.extras:
        return [(site, f"{stack}.{site}")]
    if site not in st.paths:
        raise UserError(f"Stack '{stack}' has no component or extra '{site}'; components: "
                        f"{', '.join(st.paths)}; extras: {', '.join(st.extras) or 'none'}.")
    return [(i, f"{stack}.{i}.{site}") for i in range(st.num_layers)]


def resolve_position(model: ModelView, stack: str, position: str) -> str:
    """``position`` as given; ``auto`` is ``last`` on an LM or decoder and ``mean`` on an encoder.

    An LM / decoder (the model's lens stack, a stack with an unembedding, or one that runs per decode step) is
    causal: its last position has read the whole input (the papers' choice). Any other stack is an encoder:
    bidirectional, and its last position is only the end of the clip (on Whisper, the last 20 ms frame, whose
    deep states are dominated by a few outlier units), so the utterance is its mean over the valid positions.
    """
    if position != "auto":
        return position
    return "last" if model.causal(stack) else "mean"


def auto_position_note(stack: str, position: str) -> str:
    """The note a run gets when ``position=auto`` chose the mean for an encoder stack."""
    return (f"position=auto: the mean over the valid positions of '{stack}' (it runs once over the whole input, "
            "so its last position is only the end of the clip); pass position=last to read that instead.")


def text_side_missing(model: ModelView, dataset: Dataset) -> str | None:
    """Why no text item can stand beside the speech (None when the data hold text items)."""
    if any(modality_of(it) == "text" for it in dataset):
        return None
    if "text" not in model.modalities:
        return (f"'{model.name}' takes speech input only and has no text encoder, so a sentence has no "
                "text-side representation to compare its speech with")
    return "the data hold no text items (modality=text) to pair with the speech by semantic_id"


def site_pattern(model: ModelView, stack: str, site: str) -> str:
    """The pattern the engine expands: ``stack.*.site`` for a per-layer component, ``stack.extra`` otherwise."""
    st = model.resolved[stack]
    return f"{stack}.{site}" if site in st.extras else f"{stack}.*.{site}"


def load_layer(store: Any, site: str, position: str, ids: Sequence[str]) -> np.ndarray:
    """One site's vectors for ``ids`` (in that order) as float64, so sums over many items stay exact."""
    _, arrays = store.load([f"{site}@{position}"], order=list(ids))
    return np.asarray(arrays[f"{site}@{position}"], dtype=np.float64)


def modality_of(item: Stimulus) -> str:
    """The ``modality`` label, else inferred: an item with audio is speech, one without is text."""
    return str(item.labels.get("modality") or ("speech" if item.has_audio else "text"))


def stored_items(dataset: Dataset, store: Any, keys: Sequence[str] | None = None) -> list[Stimulus]:
    """Dataset items the store holds, in dataset order; with ``keys``, only those stored with every key.

    The engine skips sites on stacks an item never reaches (a text item has no speech-encoder rows), so an
    analysis of such a stack asks for its keys and gets the items that have them.
    """
    held = store.stored_ids() if keys is None else store.ids_with(keys)
    return [it for it in dataset if it.id in held]


def items_reaching(dataset: Dataset, store: Any, stack: str, key: str, notes: list[str] | None = None
                   ) -> list[Stimulus]:
    """Items stored with ``key`` (a site of ``stack``); the stored items left out are counted in ``notes``."""
    every = stored_items(dataset, store)
    have = stored_items(dataset, store, [key])
    if notes is not None and len(have) < len(every):
        kept = {it.id for it in have}
        counts: dict[str, int] = {}
        for it in every:
            if it.id not in kept:
                counts[modality_of(it)] = counts.get(modality_of(it), 0) + 1
        what = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
        note = f"{what} items never reach '{stack}' (no rows for its sites), so they are left out."
        if note not in notes:
            notes.append(note)
    return have


def parallel_index(items: Iterable[Stimulus]) -> tuple[dict[tuple[str, str], dict[str, str]], int]:
    """``{(language, modality): {semantic_id: item id}}`` keeping the first item per key, and how many were dropped.

    Several recordings of one sentence (voices, conditions) would otherwise weigh a sentence more than others;
    like Lee et al. (seed 001), who remove duplicate utterances, one item stands for each sentence.
    """
    index: dict[tuple[str, str], dict[str, str]] = {}
    dropped = 0
    for it in items:
        if "semantic_id" not in it.labels or "language" not in it.labels:
            continue
        group = index.setdefault((str(it.labels["language"]), modality_of(it)), {})
        sid = str(it.labels["semantic_id"])
        if sid in group:
            dropped += 1
        else:
            group[sid] = it.id
    return index, dropped


def matched_ids(index: dict[tuple[str, str], dict[str, str]], a: tuple[str, str], b: tuple[str, str]
                ) -> tuple[list[str], list[str], list[str]]:
    """Item ids of groups ``a`` and ``b`` paired by semantic id (sorted ids, so pairing never depends on order)."""
    common = sorted(set(index.get(a, {})) & set(index.get(b, {})))
    return common, [index[a][s] for s in common], [index[b][s] for s in common]


def spread_layers(layers: Sequence[Layer], chosen: Sequence[int] | None) -> list[Layer]:
    """Chosen layers (negative counts from the end), default first / middle / last."""
    n = len(layers)
    if chosen is None:
        picks = sorted({0, n // 2, n - 1})
    else:
        bad = [c for c in chosen if not -n <= c < n]
        if bad:
            raise UserError(f"Layers {bad} are out of range; there are {n} layers (0..{n - 1}).")
        picks = list(dict.fromkeys(c % n for c in chosen))
    return [layers[i] for i in picks]


def pair_layers(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Pair layers of two stacks: i with i when depths match, else by relative depth.

    Every layer of the shallower stack is paired with the layer of the deeper one at the same fraction of its
    depth (``round(i·(n_deep−1)/(n_shallow−1))``), so first meets first and last meets last.
    """
    if n_a == n_b:
        return [(i, i) for i in range(n_a)]
    short, deep = min(n_a, n_b), max(n_a, n_b)
    mapped = [(i, int(round(i * (deep - 1) / max(short - 1, 1)))) for i in range(short)]
    return mapped if n_a <= n_b else [(j, i) for i, j in mapped]
