"""The one module that talks to nnsight.

Everything else describes *what* to read or change as a list of :class:`Op`; this module runs the ops inside a
single nnsight trace per batch, in the model's execution order (nnsight refuses out-of-order access), and hands
back plain tensors. Keeping nnsight behind this small surface means an nnsight API change touches one file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from nnsight import NNsight

from .errors import UserError
from .stacks import get_module
from .steps import Steps, last_step
from .taps import arming

Reader = Callable[[torch.Tensor, dict], torch.Tensor]
Editor = Callable[[torch.Tensor, dict], torch.Tensor]
InputEditor = Callable[[tuple, dict, dict], tuple[tuple, dict]]


@dataclass
class Op:
    """One read or edit of one module, run when the forward pass reaches it.

    ``kind``: ``read`` saves ``fn(value, state)`` under ``key``; ``edit`` replaces the value by ``fn(value, state)``;
    ``edit_call`` replaces the module's ``(args, kwargs)`` by ``fn(args, kwargs, state)``. The value is the module's
    output, or its first positional input when ``io`` is ``input``. ``state`` is shared by all ops of a trace (edits
    can use earlier reads) and holds ``step`` during generation. ``steps``: the decode steps the op runs at during
    generation (None: every step; see :mod:`.steps`); step 1 is the prompt pass.
    """

    module: str
    kind: str
    fn: Callable
    key: str | None = None
    steps: Steps = (1,)
    io: str = "output"
    order: tuple[int, int] = (0, 0)

    @property
    def at_start(self) -> bool:
        """Whether the op acts when its module starts (inputs) rather than when it finishes (outputs)."""
        return self.kind == "edit_call" or self.io == "input"


def _child(env: Any, name: str) -> Any:
    """The envoy of submodule ``name``. nnsight mounts a submodule named after a value it serves (every BERT layer
    has an ``output`` module) as ``E_<name>``, so a module path through it resolves there, not to the value."""
    mounted = env.__dict__.get(f"{getattr(env, 'OVERLOAD_PREFIX', 'E_')}{name}")
    return mounted if mounted is not None else getattr(env, name)


def _first(output: Any) -> torch.Tensor:
    """Attention and some layers return tuples; the hidden states are the first element."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


class Tracer:
    """Wraps a loaded torch model with nnsight and runs op lists against it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        with warnings.catch_warnings():  # BERT's `output` submodules: _env resolves them, the notice is noise here
            warnings.filterwarnings("ignore", message=".*nnsight already serves.*")
            self.envoy = NNsight(model)
        self._envoys: dict[str, Any] = {}

    def _env(self, path: str) -> Any:
        if path not in self._envoys:
            env = self.envoy
            for part in path.split("."):
                env = env[int(part)] if part.isdigit() else _child(env, part)
            self._envoys[path] = env
        return self._envoys[path]

    def execution_order(self, inputs: dict[str, Any], paths: Sequence[str]) -> dict[str, tuple[int, int]]:
        """When each module first starts and first finishes, recorded with plain torch hooks on one forward.

        nnsight hands out a module's input when it starts and its output when it finishes, and refuses to go
        back, so input edits are ordered by start and output reads/edits by finish. Lazy taps among ``paths`` are
        armed, as they are in the traces that use the order.
        """
        events: dict[tuple[str, str], int] = {}

        def mark(path: str, what: str) -> Callable:
            def hook(*_: Any) -> None:
                events.setdefault((path, what), len(events))
            return hook

        handles = []
        for p in set(paths):
            mod = get_module(self.model, p)
            handles += [mod.register_forward_pre_hook(mark(p, "start")), mod.register_forward_hook(mark(p, "end"))]
        try:
            with torch.no_grad(), arming(self.model, paths):
                self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        missing = [p for p in paths if (p, "end") not in events]
        if missing:
            raise UserError(f"These modules never ran in a forward pass, so they cannot be read: {missing[:5]}")
        return {p: (events[(p, "start")], events[(p, "end")]) for p in paths}

    def run(self, inputs: dict[str, Any], ops: Sequence[Op]) -> dict[str, torch.Tensor]:
        """One forward pass with every op applied at its module; returns ``{key: tensor}`` for the reads."""
        ops = sorted(ops, key=lambda o: o.order)
        state: dict[str, Any] = {}
        with torch.no_grad(), arming(self.model, [op.module for op in ops]):
            with self.envoy.trace(**inputs):
                for op in ops:
                    _apply(self._env(op.module), op, state)
        return {op.key: state[op.key] for op in ops if op.kind == "read"}

    def generate(self, inputs: dict[str, Any], ops: Sequence[Op], max_new_tokens: int,
                 until_eos: bool = False,
                 **gen_kwargs: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Run ``generate``, applying step-scoped ops at each step; returns (reads, generate's output).

        Steps are numbered from 1 (the prompt pass, which predicts the first new token); each op runs at its
        ``steps``. Each read returns the value from the last step it ran at (a read that pools over steps keeps its
        own running state).
        By default exactly ``max_new_tokens`` tokens are made (end-of-sequence is suppressed until then, so
        every row has every step); ``until_eos`` lets generation stop as it normally would.
        """
        ops = sorted(ops, key=lambda o: o.order)
        reads: dict[str, torch.Tensor] = {}
        box: dict[str, Any] = {}

        def run_generate(*args: Any, **kwargs: Any) -> Any:
            box["output"] = self.model.generate(*args, **kwargs)
            return box["output"]

        # nnsight advances a loop step only when the body touches a module, so an open-ended loop needs an op
        # that runs at every step; otherwise the loop stops after the last step any op needs, and generation
        # goes on untouched.
        last = last_step([op.steps for op in ops])
        if not until_eos:
            gen_kwargs["min_new_tokens"] = max_new_tokens
        elif not ops:
            with torch.no_grad():
                return {}, self.model.generate(**inputs, max_new_tokens=max_new_tokens, **gen_kwargs)
        steps = range(max_new_tokens) if not until_eos else (None if last is None else range(min(last, max_new_tokens)))
        with torch.no_grad(), warnings.catch_warnings(), arming(self.model, [op.module for op in ops]):
            # An open-ended loop ends when generation stops; nnsight reports the step it waited for.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.envoy.trace(**inputs, fn=run_generate, max_new_tokens=max_new_tokens,
                                  **gen_kwargs) as tracer:
                for index in (tracer.iter[:] if steps is None else tracer.iter[steps.start:steps.stop]):
                    step = index + 1
                    state: dict[str, Any] = {"step": step}
                    for op in ops:
                        if op.steps is not None and step not in op.steps:
                            continue
                        _apply(self._env(op.module), op, state)
                        if op.kind == "read":
                            reads[op.key] = state[op.key]
        return reads, box["output"]


def _apply(env: Any, op: Op, state: dict) -> None:
    if op.kind == "edit_call":
        args, kwargs = env.inputs
        env.inputs = op.fn(args, kwargs, state)
    elif op.io == "input":
        if op.kind == "read":
            state[op.key] = op.fn(env.input, state)
        else:
            env.input = op.fn(env.input, state)
    elif op.kind == "read":
        state[op.key] = op.fn(_first(env.output), state)
    elif op.kind == "edit":
        out = env.output
        env.output = _replace_first(out, op.fn(_first(out), state))
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown op kind {op.kind}")
