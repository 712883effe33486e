"""Generated outputs as JSON lines (``outputs.jsonl``), appended per batch and resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .files import write_text


class OutputStore:
    """Generated outputs as JSON lines (``{"id", "output", ...}``), appended per batch and resumable.

    Lines go to ``<name>.partial`` while the run is going; the file gets its final name only when every item
    is in, so a file called ``outputs.jsonl`` is always complete.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.partial.is_file():  # drop a line an interruption cut short, so appends start clean
            kept = self._rows(self.partial)
            write_text(self.partial, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in kept))

    @property
    def complete(self) -> bool:
        return self.path.is_file()

    def _rows(self, path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by an interruption; it is generated again
        return rows

    def stored_ids(self) -> set[str]:
        path = self.path if self.complete else self.partial
        return {r["id"] for r in self._rows(path)} if path.is_file() else set()

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.complete:
            raise UserError(f"{self.path} is already complete; use another --out folder to generate again.")
        with open(self.partial, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def mark_complete(self, order: Sequence[str]) -> None:
        """Rewrite in dataset order under the final name (a store completed earlier is checked, not rewritten)."""
        source = self.partial if self.partial.is_file() or not self.complete else self.path
        rows = {r["id"]: r for r in self._rows(source)} if source.is_file() else {}
        missing = [i for i in order if i not in rows]
        if missing:
            raise UserError(f"{len(missing)} items have no output (e.g. '{missing[0]}'); the run is incomplete.")
        if source == self.partial:
            write_text(self.path, "".join(json.dumps(rows[i], ensure_ascii=False, default=str) + "\n" for i in order))
            self.partial.unlink(missing_ok=True)

    def load(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if not self.complete:
            raise UserError(f"{self.path} was not completed; rerun with the same --out to finish it.")
        rows = self._rows(self.path)
        if order is None:
            return rows
        by_id = {r["id"]: r for r in rows}
        return [by_id[i] for i in order]
