"""Typed, JSON-serialisable option specs shared by analyses and interventions.

On the command line a spec is ``NAME``, ``NAME:key=value,key=value`` or the path of a JSON file
(``{"name": ..., "params": {...}}``). Parameters are declared as dataclass fields; values are coerced to the
declared types, so ``scale=0.5`` becomes a float and unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from .errors import UserError


def split_spec(text: str) -> tuple[str, dict[str, Any]]:
    """Split ``NAME:k=v,...`` (or a JSON file path) into a name and raw parameters."""
    path = Path(text)
    if text.endswith(".json") or (path.is_file() and path.suffix == ".json"):
        if not path.is_file():
            raise UserError(f"Spec file not found: {text}")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"Spec file {text} is not valid JSON ({exc.msg}).") from None
        if not isinstance(obj, dict) or "name" not in obj:
            raise UserError(f"Spec file {text} must hold an object with a 'name' and optional 'params'.")
        return str(obj["name"]), dict(obj.get("params") or {})
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    if rest:
        for part in _split_top(rest):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise UserError(f"Spec '{text}': expected key=value, got '{part}'.")
            params[key.strip()] = value.strip()
    return name.strip(), params


def _split_top(text: str) -> list[str]:
    """Split on commas that separate parameters; a comma inside [...] or {...} belongs to a list or object value."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Turn a command-line string (or JSON value) into the declared type, with a clear error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        errors = []
        for a in args:
            try:
                return coerce_value(value, a, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[-1])
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.strip("[]").replace(";", ",").split(",") if v.strip()]
        return [coerce_value(v, inner, where) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{where}: expected a JSON object, got '{value}'.") from None
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float, str):
            if tp is int and isinstance(value, str) and not value.lstrip("-").isdigit():
                raise ValueError
            return tp(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{where}: expected {name}, got '{value}'.") from None
    return value


def build_params(cls: type, params: dict[str, Any], what: str) -> Any:
    """Instantiate the dataclass ``cls`` from raw parameters with type coercion and clear errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(params) - set(fields)
    if unknown:
        raise UserError(f"{what}: unknown parameter(s) {sorted(unknown)}; valid: {', '.join(fields) or 'none'}.")
    kwargs = {k: coerce_value(v, hints[k], f"{what} parameter '{k}'") for k, v in params.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{what}: {exc}") from None


def spec_to_json(obj: Any) -> dict[str, Any]:
    """The JSON form saved with a run so the same spec can be passed back as a file."""
    return {"name": obj.name, "params": dataclasses.asdict(obj)}
