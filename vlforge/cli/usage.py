"""What the subcommands share: the error that becomes argparse's usage message, and name suggestions."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """A request the command cannot run (an unknown name, a missing override): reported as argparse
    reports bad arguments, with the subcommand's usage line and exit code 2."""


def close_matches(word: str, choices: Iterable[str], limit: int = 5) -> list[str]:
    """Up to `limit` of `choices` that look like `word`: near spellings first, then names containing it."""
    choices = list(choices)
    near = difflib.get_close_matches(word, choices, n=limit, cutoff=0.75)
    containing = [c for c in choices if word and word.lower() in c.lower() and c not in near]
    return (near + containing)[:limit]


def unknown_name(kind: str, name: str, choices: Iterable[str], listing: str) -> UsageError:
    """The error for `name` not among `choices`, naming the close ones and the command that lists them all."""
    matches = close_matches(name, choices, limit=4)
    hint = (f"; did you mean {matches[0]}?" if len(matches) == 1
            else f"; did you mean one of {', '.join(matches)}?" if matches else "")
    return UsageError(f"unknown {kind} '{name}'{hint} (`{listing}` lists them all)")
