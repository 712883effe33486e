"""Where the parts of a released model come from: a local directory or a hub id, read without running its code.

The three releases built here ship only their trained parts and name the base models they stand on (a Whisper, a
Llama/Vicuna, BEATs). Every part is read from ``safetensors`` or from a PyTorch pickle opened with
``weights_only=True``; anything missing becomes one :class:`UserError` sentence that says what to download.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from lalm_probe.core.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_local(source: str | Path) -> bool:
    """A source that names a path (rather than a hub id): it must exist, and a typo is caught here."""
    src = str(source)
    if Path(src).exists():
        return True
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UserError(f"Local path '{src}' does not exist; pass an existing directory or file, or a hub id.")
    return False


def base_model_source(checkpoint: str | Path, model_id: str | None) -> str | None:
    """Where a base model that a release names by hub id comes from: a folder of that name inside a local checkpoint
    directory when there is one (``<dir>/openai/whisper-large-v3-turbo``: one folder then carries the whole release
    offline), else the id itself (the hub or its local cache)."""
    if model_id and Path(str(checkpoint)).is_dir() and (Path(str(checkpoint)) / model_id).is_dir():
        return str(Path(str(checkpoint)) / model_id)
    return model_id


def fetch(source: str | Path, filename: str, *, what: str, required: bool = True) -> Path | None:
    """One file of a part: ``<dir>/<filename>`` for a local directory, else from the hub (or its local cache)."""
    src = str(source)
    if is_local(src):
        path = Path(src) / filename if Path(src).is_dir() else Path(src)
        if path.is_file():
            return path
        if required:
            raise UserError(f"{what}: '{filename}' is missing from '{src}'; the directory does not hold that part.")
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=src, filename=filename))
    except RemoteEntryNotFoundError:
        if not required:
            return None
        raise UserError(f"{what}: '{src}' on the hub has no file '{filename}'; it is not the release this loader "
                        "reads.") from None
    except LocalEntryNotFoundError:
        if not required and _cached_repo(src):
            return None  # offline, with the repository cached: the file is simply not part of it
        raise UserError(f"{what}: could not get '{filename}' of '{src}' (not a local directory, and not in the local "
                        f"Hugging Face cache or reachable on the hub). Download it on a machine with network access "
                        f"(`hf download {src}`) and pass the local directory instead.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: could not get '{filename}' of '{src}' ({str(exc).splitlines()[0][:120]}). "
                        f"Download it (`hf download {src}`) and pass the local directory instead.") from None


def _cached_repo(repo_id: str) -> bool:
    """Whether the hub cache holds any snapshot of ``repo_id`` (so a missing file there really is absent)."""
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache directory at all
        return False


def read_json(source: str | Path, filename: str, *, what: str) -> dict[str, Any]:
    """A JSON file of a part (``config.json``, ``preprocessor_config.json``)."""
    path = fetch(source, filename, what=what)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: '{path}' is not readable JSON ({exc}).") from None


def torch_load(path: Path, *, what: str, allow_pickle: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers unless the user opts into full unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError:  # not a zip archive (old format): mmap is unavailable
        try:
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure becomes one sentence
            raise _pickle_error(path, what, exc) from None
    except Exception as exc:  # noqa: BLE001
        raise _pickle_error(path, what, exc) from None


def _pickle_error(path: Path, what: str, exc: Exception) -> UserError:
    if "weights_only" in str(exc) or "Unsupported global" in str(exc):
        return UserError(f"{what}: '{path}' holds pickled Python objects besides tensors; refusing to unpickle it. "
                         "If you trust the file, load it with allow_pickle=True.")
    return UserError(f"{what}: '{path}' is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]}).")


def weight_files(source: str | Path, *, what: str) -> list[Path]:
    """The weight files of a transformers-layout part, sharded or not, safetensors preferred."""
    for name in WEIGHT_FILES:
        path = fetch(source, name, what=what, required=False)
        if path is None:
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [fetch(source, s, what=what) for s in shards]  # type: ignore[misc]
        return [path]
    raise UserError(f"{what}: '{source}' has no weights ({', '.join(WEIGHT_FILES)}); download the full model "
                    f"(`hf download {source}`) or pass a directory that holds it.")


def read_tensors(files: Iterable[Path], *, what: str, prefix: str = "",
                 allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` (stripped), read lazily from safetensors where possible."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key)
        else:
            state = torch_load(path, what=what, allow_pickle=allow_pickle)
            out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
           dtype: torch.dtype | None = None, ignore_missing: Iterable[str] = (),
           ignore_unexpected: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module`` by assignment (so a meta-built module is materialised), all keys accounted for.

    ``ignore_*`` hold ``fnmatch`` patterns of keys that may be absent (parts loaded elsewhere) or extra (buffers
    the release stores but recomputes).
    """
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise UserError(f"{what}: the checkpoint's shapes do not fit this configuration ({detail[:200]}).") from None
    unexpected = [k for k in result.unexpected_keys if not any(fnmatch(k, p) for p in ignore_unexpected)]
    missing = [k for k in result.missing_keys if not any(fnmatch(k, p) for p in ignore_missing)]
    if unexpected:
        raise UserError(f"{what}: the checkpoint has {len(unexpected)} weights this architecture does not know "
                        f"(first: {unexpected[:3]}); it is not the release this loader reads.")
    if missing:
        raise UserError(f"{what}: {len(missing)} weights are missing from the checkpoint (first: {missing[:3]}); "
                        f"the download is incomplete or is another model.")
