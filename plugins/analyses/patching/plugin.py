"""Activation patching effects per site and position: the layer x position map of a ``patch`` sweep.

It reads the copies a ``patch:...,sweep=true`` intervention makes (one per target and patched site/position, with
labels naming them) and the unpatched originals beside them, all from the intervened store; it never runs the
model. For each copy, with a the answer of its source (clean) run and b that of its target (corrupted) run, it
reports the normalised effect ``(LD(patched) − LD(target)) / (LD(source) − LD(target))`` of the logit difference
``LD = logit[a] − logit[b]`` at ``position`` of the last layer (the model's own output), and whether the output
moved to a (the top token, or with ``label`` the most probable of the label's words, e.g. Whisper's language
tokens, so "moved" is the detected language becoming the source's). Answers are the label words of the two items'
label values with ``label``; otherwise each unpatched run's own top token. Pairs whose answers coincide have no
effect to normalise (NaN) and are left out of the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses.hub.measure import mean_ci
from lalm_probe.plugins.analyses.patching.measure import normalised_effect
from lalm_probe.plugins.analyses.patching.plots import effect_map

NEEDS_SWEEP = ("patching reads the copies a patch sweep makes; add --intervention "
               "patch:source_where=<label>:<value>,sweep=true (or source=<id> / pairs=...).")


@dataclass
class Patching(Analysis):
    name: ClassVar[str] = "patching"
    description: ClassVar[str] = "Activation patching: the effect of each patched site and position (a patch sweep)"

    stack: str | None = None  # where the output is read; default: the lens stack
    position: str = "last"
    label: str | None = None  # answers are this label's words (Whisper: language -> <|de|>); default: top tokens
    chunk: int = 64

    def _stack(self, model: ModelView) -> str:
        return model.stack_named("patching", self.stack, unembed=True)

    def check(self, dataset: Dataset) -> None:
        if self.label:
            dataset.label_values(self.label)

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        stack = self._stack(model)
        return Requirements(sites=[f"{stack}.{model.resolved[stack].num_layers - 1}.out"], positions=[self.position])

    def _scan(self, model: ModelView, store: Any, ids: list[str], fn: Callable[[np.ndarray], Any]) -> list[Any]:
        """``fn`` of the output logits of ``ids``, chunk by chunk (the vocabulary can be large)."""
        stack = self._stack(model)
        last = model.resolved[stack].num_layers - 1
        states = store.array(f"{stack}.{last}.out@{self.position}", ids)
        out = []
        for start in range(0, len(ids), self.chunk):
            logits = model.lens(states[start:start + self.chunk], stack, True, last).cpu().numpy()
            out.extend(fn(logits))
        return out

    def _answers(self, model: ModelView, dataset: Dataset, base: list[str], store: Any
                 ) -> tuple[dict[str, int], list[int] | None]:
        """Each unpatched item's answer token, and the tokens an output is read among (None: the whole vocabulary)."""
        if self.label is None:
            return dict(zip(base, self._scan(model, store, base, lambda lg: lg.argmax(-1).tolist()))), None
        words = model.label_words(self.label) or {}
        tok = model.tokenizer

        def token(value: str) -> int:
            pieces = tok(str(words.get(value, value)), add_special_tokens=False)["input_ids"]
            if not pieces:
                raise UserError(f"patching: the {self.label} '{value}' tokenizes to nothing.")
            return int(pieces[0])

        unpatched = set(base)
        labels = {it.id: str(it.labels[self.label]) for it in dataset if it.id in unpatched}
        answers = {i: token(v) for i, v in labels.items()}
        among = sorted({token(v) for v in words} | set(answers.values()))
        return answers, among

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        store = stores.intervened
        copies = [it for it in dataset if "patch_of" in it.labels]
        if store is None or not copies:
            raise UserError(NEEDS_SWEEP)
        base = list(dict.fromkeys([it.id for it in dataset if "patch_of" not in it.labels]))
        unpatched = set(base)
        for it in copies:
            for role in ("patch_of", "patch_source"):
                if it.labels[role] not in unpatched:
                    raise UserError(f"patching: item '{it.labels[role]}' of the copy '{it.id}' was not evaluated "
                                    "unpatched, so there is nothing to compare the patch with.")
        answers, among = self._answers(model, dataset, base, store)
        tokens = sorted(set(answers.values()))
        col = {t: j for j, t in enumerate(tokens)}

        def gather(logits: np.ndarray) -> list[tuple[np.ndarray, int]]:
            top = logits.argmax(-1) if among is None else np.asarray(among)[logits[:, among].argmax(-1)]
            return list(zip(logits[:, tokens], top.tolist()))

        ids = base + [it.id for it in copies]
        seen = dict(zip(ids, self._scan(model, store, ids, gather)))

        def ld(item: str, a: int, b: int) -> float:
            return float(seen[item][0][col[a]] - seen[item][0][col[b]])

        rows: dict[tuple[str, str], dict[str, list]] = {}
        per_copy = []
        for it in copies:
            target, source = it.labels["patch_of"], it.labels["patch_source"]
            a, b = answers[source], answers[target]
            effect = normalised_effect(np.array([ld(it.id, a, b)]), np.array([ld(target, a, b)]),
                                       np.array([ld(source, a, b)]))[0] if a != b else np.nan
            moved = seen[it.id][1] == a
            cond = (it.labels["patch_site"], it.labels["patch_position"])
            entry = rows.setdefault(cond, {"effect": [], "moved": [], "layer": it.labels.get("patch_layer"),
                                           "component": it.labels.get("patch_component")})
            if a != b:
                entry["effect"].append(effect)
                entry["moved"].append(moved)
            per_copy.append({"id": it.id, "target": target, "source": source, "site": cond[0], "position": cond[1],
                             "effect": effect, "moved": bool(moved)})
        return self._result(model, rows, per_copy, len(base))

    def _result(self, model: ModelView, rows: dict, per_copy: list[dict], n_base: int) -> Result:
        stack = self._stack(model)
        pairs = {(c["target"], c["source"]) for c in per_copy}
        compared = {(c["target"], c["source"]) for c in per_copy if np.isfinite(c["effect"])}
        result = Result(summary={"stack": stack, "output read at": self.position,
                                 "answers": f"the label '{self.label}'" if self.label else "each run's top token",
                                 "patched pairs": len(pairs), "pairs with different answers": len(compared),
                                 "conditions": len(rows)})
        table = []
        for (site, pos), entry in rows.items():
            eff = np.asarray(entry["effect"], dtype=np.float64)
            m, lo, hi = mean_ci(eff) if len(eff) else (np.nan, np.nan, np.nan)
            table.append({"site": site, "component": entry["component"], "layer": entry["layer"], "position": pos,
                          "pairs": len(eff), "effect": m, "ci_low": lo, "ci_high": hi,
                          "moved": float(np.mean(entry["moved"])) if entry["moved"] else np.nan})
        result.tables.append(Table("Patching effect per site and position (normalised logit difference; moved: "
                                   "the output became the source's)", table))
        result.tables.append(Table("Per patched copy", per_copy, show=False))
        layered = [r for r in table if r["layer"] is not None]
        components = list(dict.fromkeys(r["component"] for r in layered))
        positions = list(dict.fromkeys(r["position"] for r in layered))
        layers = sorted({r["layer"] for r in layered})
        maps: dict[str, np.ndarray] = {}
        for what in ("effect", "moved"):
            for comp in components:
                grid = np.full((len(layers), len(positions)), np.nan)
                for r in layered:
                    if r["component"] == comp:
                        grid[layers.index(r["layer"]), positions.index(r["position"])] = r[what]
                result.arrays[f"{what}/{comp}"] = grid
                if what == "effect":
                    maps[comp] = grid
                for j, pos in enumerate(positions):
                    if what == "moved" and np.isfinite(grid[:, j]).any():
                        result.summary[f"decided from layer ({comp} @{pos}; the tool's summary)"] = _decided_from(
                            grid[:, j], layers)
        result.arrays["layers"] = np.asarray(layers)
        result.arrays["copy_effect"] = np.asarray([c["effect"] for c in per_copy], dtype=np.float64)
        if maps and layers:
            result.figures["patching_effect"] = effect_map(maps, layers, positions,
                                                           f"Activation patching on {stack}: normalised effect")
        result.notes.append("decided from layer: the first layer from which patching moves at least half of the "
                            "outputs to the source's at every later layer (the tool's summary, not a paper metric); "
                            "None when no layer does. Layers are site indices from 0.")
        return result


def _decided_from(moved: np.ndarray, layers: list[int]) -> int | None:
    """The first layer from which the moved rate stays at or above one half."""
    ok = np.nan_to_num(moved, nan=0.0) >= 0.5
    for i in range(len(ok)):
        if ok[i:].all():
            return int(layers[i])
    return None


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Patching]
