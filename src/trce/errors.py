"""The one exception type for user-facing failures.

A `TrceError` carries a single line that names the bad value and, where there is one, the fix.
The CLI prints it as `trce: error: ...` and exits with status 2; anything else is a bug and keeps
its traceback.

Library errors name the argument or setting by its Python name (`limit must be at least 1, got 0`)
and carry it as `field`; the CLI names its own flag instead (`--limit must be at least 1, got 0`)
through `message_for`.
"""

from __future__ import annotations

from collections.abc import Callable


class TrceError(Exception):
    """A user mistake or an environment problem, with a message fit to show as one line."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    def message_for(self, rename: Callable[[str], str | None]) -> str:
        """The message with its leading field name replaced by `rename(field)` (a CLI flag), when it has one."""
        text = str(self)
        if self.field and text.startswith(self.field + " "):
            name = rename(self.field)
            if name:
                return name + text[len(self.field):]
        return text


def choose(kind: str, name: str, available) -> str:
    """Validate `name` against `available`, naming the choices (and a close match) on a typo."""
    import difflib

    options = sorted(available)
    if name in options:
        return name
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TrceError(f"unknown {kind} {name!r}{hint}; available: {', '.join(options)}")
