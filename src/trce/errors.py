"""The one exception type for user-facing failures.

A `TrceError` carries a single line that names the bad value and, where there is one, the fix.
The CLI prints it as `trce: error: ...` and exits with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class TrceError(Exception):
    """A user mistake or an environment problem, with a message fit to show as one line."""


def choose(kind: str, name: str, available) -> str:
    """Validate `name` against `available`, naming the choices (and a close match) on a typo."""
    import difflib

    options = sorted(available)
    if name in options:
        return name
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TrceError(f"unknown {kind} {name!r}{hint}; available: {', '.join(options)}")
