"""The one exception type for bad user input.

Library code raises :class:`UserError` for anything the user can fix (a wrong path, an
unknown name, a clashing option).  The CLI turns it into a single line on stderr and exit
code 2; Python callers get an ordinary exception with the same message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' suffix listing the closest names, or ''."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(choices)), n=n, cutoff=0.5)  # aliases repeat names
    return f" (did you mean: {', '.join(close)}?)" if close else ""
