"""Language-selective units per decoding step (Nakai et al., seed 002): the ``neurons`` analysis.

For every unit of the chosen sites — by default every Linear, norm and convolution output of every stack, the
units seed 002's released code hooks — the average precision of its response for one label value against the
rest (target language vs the other languages), computed within one modality (``modality=each``, the paper's
unimodal definition) or over both (``joint``). Responses are pooled as the paper does: the mean over the sequence
on stacks that run once per input (encoders, cross-attention keys and values), and at decode steps on the decoder:
``pooling=step`` reads the current position at step t (the paper's text), ``pooling=prefix`` the mean over the
decoder positions up to it (the released code's one pass per prefix). ``steps=[]`` reads the decoder once, at the
last position of its prompt (Whisper's language-identification position). The forcing values come from the same
pass: median and 90th percentile over positives, mean and median over negatives.

It writes one expertise table per label value, modality and step (``expertise/<label>=<value>/<modality>/
<step>.csv``: ``site, stack, layer, component, unit, ap, on_p50, on_p90, off_mean, off_p50``) and the top-k,
bottom-k and both-2k sets per stack beside it; ``median-patch`` reads them. With both modalities it compares the
speech and text selections on one stack (default the decoder): the overlap matrix, its diagonal ratio with the
exact permutation test, the Spearman correlation of per-unit AP with its diagonal concentration, and the ratio's
sensitivity to k. Layers are site indices from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Reads, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.view import ModelView
from lalm_probe.core.vocab import is_canonical
from lalm_probe.plugins.analyses.neurons.expertise import unit_expertise
from lalm_probe.plugins.analyses.neurons.overlap import (
    DEFINITIONS,
    aligned_ap,
    ap_spearman,
    diagonal_concentration,
    diagonal_ratio,
    overlap_matrix,
    permutation_test,
    ratio_by_k,
)
from lalm_probe.plugins.analyses.neurons.plots import heatmap, placement
from lalm_probe.plugins.analyses.neurons.selection import KINDS, select, selected_keys
from lalm_probe.plugins.analyses.neurons.table import ExpertiseTable, expertise_table, write_csv
from lalm_probe.plugins.analyses.reps import modality_of

# Component groups: seed 002's units are the outputs of every Linear, norm, convolution and GLU module.
GROUPS = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o", "cross_q", "cross_k", "cross_v", "cross_o"),
    "mlp": ("mlp_gate", "mlp_up", "mlp_down", "ffn1_up", "ffn1_down"),
    "norms": ("attn_norm", "attn_post_norm", "cross_norm", "mlp_norm", "mlp_post_norm", "ffn1_norm", "conv_norm",
              "conv_dw_norm", "final_norm"),
    "conv": ("conv_pw1", "conv_glu", "conv_dw", "conv_pw2"),
}
GROUPS["all"] = tuple(c for g in GROUPS.values() for c in g)


def table_name(label: str, value: str, modality: str, position: str) -> str:
    """Where a run keeps one expertise table (``median-patch`` looks it up by these four)."""
    return f"expertise/{label}={value}/{modality}/{position.replace(':', '')}.csv"


@dataclass
class Neurons(Analysis):
    """Average precision of every unit for each label value, per modality and decode step (seed 002)."""

    name: ClassVar[str] = "neurons"
    description: ClassVar[str] = "Language-selective units per decoding step: AP, forcing values, overlaps (seed 002)"

    label: str = "language"
    components: list[str] = field(default_factory=lambda: ["all"])  # component names or groups: attention, mlp...
    stacks: list[str] | None = None  # default: every stack
    steps: list[int] = field(default_factory=lambda: [1, 6, 11])  # decoder steps; [] = the prompt's last position
    pooling: str = "step"  # step (the current position, the paper's text) or prefix (the released code's mean)
    modality: str = "each"  # each: one table per modality (unimodal, the paper); joint: speech and text together
    values: list[str] | None = None  # label values to score (default: every value present)
    k: int = 1000  # units per stack in the top-k / bottom-k / both-2k sets
    overlap_stack: str | None = None  # the stack of the speech x text comparison (default: the decoder)
    ratio: str = "trace_sum"  # the diagonal ratio: trace_sum (trace / sum) or mean_ratio (mean diag / mean off)
    ks: list[int] | None = None  # the k of the sensitivity curve (default: k/10, k/4, k/2, k, 2k)
    force_target: str | None = None  # a label whose text is forced as the decoded prefix (default: greedy)
    chunk: int | None = None  # units per AP chunk (memory is bounded by it)
    device: str = "auto"  # where AP sorts: auto (the model's GPU if it has one, else NumPy on the CPU), cpu, cuda

    def __post_init__(self) -> None:
        if self.pooling not in ("step", "prefix"):
            raise UserError("neurons: pooling must be 'step' or 'prefix'.")
        if self.modality not in ("each", "joint"):
            raise UserError("neurons: modality must be 'each' or 'joint'.")
        if self.ratio not in DEFINITIONS:
            raise UserError(f"neurons: ratio must be one of {', '.join(DEFINITIONS)}.")
        if self.k < 1:
            raise UserError(f"neurons: k must be at least 1, not {self.k}.")
        if any(t < 1 for t in self.steps):
            raise UserError("neurons: decode steps are numbered from 1 (the prompt pass).")
        unknown = [c for c in self.components if c not in GROUPS and not is_canonical(c)]
        if unknown:
            raise UserError(f"neurons: unknown component(s) {unknown}; use groups ({', '.join(GROUPS)}: seed 002's "
                            "units) or any component of the site vocabulary (`probe info`), e.g. mlp_act, "
                            "expert0_act, moe_router.")

    # ---- what to collect -------------------------------------------------------------------------------
    def _components(self) -> list[str]:
        return list(dict.fromkeys(c for name in self.components for c in GROUPS.get(name, (name,))))

    def sites(self, model: ModelView) -> dict[str, list[str]]:
        """Per stack, the site patterns scored."""
        stacks = self.stacks or list(model.resolved)
        unknown = [s for s in stacks if s not in model.resolved]
        if unknown:
            raise UserError(f"neurons: the model has no stack(s) {unknown}; it has {', '.join(model.resolved)}.")
        wanted = self._components()
        out = {s: [f"{s}.*.{c}" for c in wanted if c in model.resolved[s].paths] for s in stacks}
        return {s: p for s, p in out.items() if p}

    def positions(self, model: ModelView, stack: str) -> list[str]:
        """Encoder-like stacks: the mean over the sequence; the decoder: each step (or its prompt's last position)."""
        if model.resolved[stack].spec.runs != "per_step":
            return ["mean"]
        return [f"{self.pooling}:{t}" for t in self.steps] or ["last"]

    def check(self, dataset: Dataset) -> None:
        present = sorted({str(v) for v in dataset.label_values(self.label)})
        if len(present) < 2:
            raise UserError(f"neurons: label '{self.label}' has {len(present)} value(s) in the data "
                            f"({', '.join(present)}); one value against the rest needs at least two.")
        missing = [v for v in self.values or [] if v not in present]
        if missing:
            raise UserError(f"neurons: no item has {self.label}={missing[0]}; the data has {', '.join(present)}.")

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        sites = self.sites(model)
        if not sites:
            raise UserError(f"neurons: none of the components {self.components} exists on the chosen stacks.")
        need = 2 * self.k
        for stack, patterns in sites.items():
            units = sum(model.width(site) for site in self._expand(model, patterns))
            if units < need:
                raise UserError(f"neurons: stack '{stack}' has {units} units at the chosen components, fewer than "
                                f"the {need} the top/bottom/both-{self.k} sets need; lower k.")
        reads = [Reads(patterns, self.positions(model, stack)) for stack, patterns in sites.items()]
        return Requirements(sites=[], labels=[self.label], force_target=self.force_target, more=reads)

    # ---- the analysis ----------------------------------------------------------------------------------
    def tables(self, model: ModelView, dataset: Dataset, store: Any) -> dict[tuple[str, str, str], ExpertiseTable]:
        """``(value, modality, position) -> ExpertiseTable``: every site's units, encoders at their mean."""
        groups = {"joint": list(dataset)} if self.modality == "joint" else {}
        for it in dataset if self.modality == "each" else ():
            groups.setdefault(modality_of(it), []).append(it)
        sites = self.sites(model)
        device = None if self.device == "cpu" or (self.device == "auto" and "cuda" not in model.device) else (
            model.device if self.device == "auto" else self.device)
        decoder = [s for s in sites if model.resolved[s].spec.runs == "per_step"]
        positions = self.positions(model, decoder[0]) if decoder else ["mean"]
        out = {}
        for modality, items in groups.items():
            keys = {pos: [(f"{site}", f"{site}@{pos if site.split('.')[0] in decoder else 'mean'}")
                          for stack, patterns in sites.items() for site in self._expand(model, patterns)]
                    for pos in positions}
            labels = np.array([str(it.labels[self.label]) for it in items])
            values = self.values or sorted(set(labels))
            for pos, pairs in keys.items():
                held = [(site, key) for site, key in pairs if store.ids_with([key]) >= {it.id for it in items}]
                if not held:
                    continue
                ids = [it.id for it in items]
                arrays = {site: store.array(key, ids) for site, key in held}
                for value in values:
                    y = labels == value
                    if not y.any() or y.all():
                        continue
                    out[(value, modality, pos)] = expertise_table(
                        {site: unit_expertise(array, y, chunk=self.chunk, device=device) for site, array in
                         arrays.items()})
        return out

    @staticmethod
    def _expand(model: ModelView, patterns: list[str]) -> list[str]:
        out = []
        for pattern in patterns:
            stack, _, comp = pattern.split(".")
            out += [f"{stack}.{layer}.{comp}" for layer in range(model.resolved[stack].num_layers)]
        return out

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        result = Result(summary={"label": self.label, "pooling": self.pooling, "modality": self.modality,
                                 "k": self.k, "items": len(dataset)})
        for run, store in stores.activations():
            tables = self.tables(model, dataset, store)
            if not tables:
                raise UserError(f"neurons: no label value of '{self.label}' has both positive and negative items in "
                                "any modality; nothing to rank.")
            prefix = "" if run == "baseline" else f"{run}/"
            rows = []
            for (value, modality, pos), table in tables.items():
                path = prefix + table_name(self.label, value, modality, pos)
                result.files[path] = lambda p, t=table: write_csv(t, p)
                for kind in KINDS:
                    chosen = select(table, self.k, kind)  # per stack
                    index = np.concatenate(list(chosen.values()))
                    size = 2 * self.k if kind == "both" else self.k
                    result.files[path.replace(".csv", f".{kind}{size}.csv")] = (
                        lambda p, t=table.rows(index): write_csv(t, p))
                best = int(np.argmax(table.ap))
                rows.append({"run": run, "value": value, "modality": modality, "position": pos,
                             "units": len(table), "best site": table.site[best], "best unit": int(table.unit[best]),
                             "best AP": float(table.ap[best]), "mean AP": float(table.ap.mean())})
            result.tables.append(Table(f"Expertise tables ({run})", rows))
            self._placement(result, run, tables, model)
            self._overlaps(result, run, tables, model)
        result.notes.append(f"Tables: {table_name(self.label, '<value>', '<modality>', '<position>')} (and "
                            ".top/.bottom/.both sets per stack beside them); top = AP descending, ties by layer, "
                            "site, unit.")
        return result

    def _placement(self, result: Result, run: str, tables: dict, model: ModelView) -> None:
        """Where the top-k units sit, over layers and components, per stack (seed 002 Fig. 2-3)."""
        by = {}
        first = next(iter(tables))[2]
        for (value, modality, pos), table in tables.items():
            for stack, rows in select(table, self.k, "top").items():
                once = model.resolved[stack].spec.runs != "per_step"
                if once and pos != first:
                    continue  # an encoder's units are the same at every step: one plot
                key = (modality, "mean" if once else pos, stack)
                counts = by.setdefault(key, {})
                for layer, comp in zip(table.layer[rows].tolist(), table.component[rows].tolist()):
                    counts[(layer, comp)] = counts.get((layer, comp), 0) + 1
        for (modality, pos, stack), counts in by.items():
            comps = sorted({c for _, c in counts}, key=lambda c: (GROUPS["all"].index(c) if c in GROUPS["all"]
                                                                  else len(GROUPS["all"]), c))
            grid = np.zeros((model.resolved[stack].num_layers, len(comps)))
            for (layer, comp), n in counts.items():
                grid[layer, comps.index(comp)] = n
            name = f"{run}/placement/{modality}/{pos}/{stack}"
            result.arrays[name] = grid
            result.figures[f"placement_{run}_{modality}_{pos.replace(':', '')}_{stack}"] = placement(
                grid, comps, f"top-{self.k} units of every {self.label} value: {stack}, {modality}, {pos}")

    def _overlaps(self, result: Result, run: str, tables: dict, model: ModelView) -> None:
        """Speech x text: overlap matrices, diagonal ratio with the exact permutation test, AP Spearman."""
        positions = sorted({pos for _, _, pos in tables})
        for pos in positions:
            side = {m: {v: t for (v, mm, p), t in tables.items() if mm == m and p == pos} for m in ("speech", "text")}
            languages = sorted(set(side["speech"]) & set(side["text"]))
            if len(languages) < 2:
                continue
            speech = {v: side["speech"][v] for v in languages}
            text = {v: side["text"][v] for v in languages}
            stack = self.overlap_stack or model.lens_stack or text[languages[0]].stacks()[-1]
            rows, curves = [], []
            for kind in KINDS:
                sets = {m: {v: selected_keys(t, select(t, self.k, kind, [stack])[stack]) for v, t in tables_.items()}
                        for m, tables_ in (("text", text), ("speech", speech))}
                m = overlap_matrix(sets["text"], sets["speech"])
                test = permutation_test(m)
                result.arrays[f"{run}/overlap/{pos}/{kind}"] = m.counts
                result.figures[f"overlap_{run}_{pos.replace(':', '')}_{kind}"] = heatmap(
                    m.counts, languages, f"{kind}-{self.k} overlap, text (rows) x speech (columns), {stack} {pos}")
                rows.append({"run": run, "position": pos, "kind": kind, "stack": stack,
                             f"diagonal ratio ({self.ratio})": diagonal_ratio(m, self.ratio),
                             "chance": 1 / len(languages), "permutation p": test.p_value,
                             "permutations": test.permutations})
                units = int((text[languages[0]].stack == stack).sum())
                ks = self.ks or sorted({max(1, self.k // d) for d in (10, 4, 2, 1)} | {2 * self.k})
                ks = [k for k in ks if (2 * k if kind == "both" else k) <= units]
                curve = ratio_by_k(text, speech, ks, kind, stack, self.ratio)
                result.arrays[f"{run}/overlap/{pos}/{kind}/ratio_by_k"] = np.stack([np.array(curve.ks), curve.ratios])
                curves.append({"run": run, "position": pos, "kind": kind,
                               **{f"k={k}": float(r) for k, r in zip(curve.ks, curve.ratios)}})
            rho = ap_spearman(aligned_ap(text, stack), aligned_ap(speech, stack))
            result.arrays[f"{run}/spearman/{pos}"] = rho
            result.figures[f"spearman_{run}_{pos.replace(':', '')}"] = heatmap(
                rho, languages, f"Spearman rho of unit AP, text (rows) x speech (columns), {stack} {pos}", fmt=".2f")
            where = f"@{pos} ({run}; {stack}; languages {', '.join(languages)})"
            result.tables.append(Table(f"Speech x text overlap of the selections {where}", rows))
            result.tables.append(Table(f"Diagonal ratio ({self.ratio}) by k {where}; NaN: no overlap at all", curves))
            result.summary[f"AP Spearman diagonal concentration {where}"] = diagonal_concentration(rho)


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Neurons]
