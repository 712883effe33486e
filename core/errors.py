"""Error types that separate the user's mistakes from the program's.

The CLI prints a ``UserError`` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user: an unknown name, a missing file, an impossible option."""


class PluginError(UserError):
    """A plugin that cannot be used: two plugins claim one name, or a plugin broke its contract."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """Build the 'unknown X' error with the list of what exists and a did-you-mean."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = ", ".join(known) if known else "(none installed)"
    return UserError(f"Unknown {kind} '{name}'.{hint} Available: {listing}.")
