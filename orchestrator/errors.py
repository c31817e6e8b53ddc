"""User-facing errors: each names where (file, line, dotted field), what was given and what is allowed."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

# Exit statuses the CLI returns; 2 is argparse/typer's convention for bad input.
EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Problem:
    source: str  # the spec file, or "override 'a.b=c'"
    field: str  # dotted path into the spec; "" for the file as a whole
    message: str  # says what was given, what is allowed, and the fix when there is one
    line: int | None = None

    def render(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(Exception):
    """The job cannot start as written; nothing has been started or recorded."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))

    def __reduce__(self):  # pickled with its problems: a worker process's plan sends it to the driver
        return type(self), (self.problems,)


class ResourceError(SpecError):
    """The job asks for more than the cluster can ever offer."""


def did_you_mean(given: str, allowed: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close spelling exists, else ''."""
    match = difflib.get_close_matches(given, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def is_import_deadlock(exc: BaseException) -> bool:
    """CPython broke a cycle between two threads' module locks by raising in one of them; a retry succeeds."""
    return type(exc).__name__ == "_DeadlockError" or "deadlock detected by _ModuleLock" in str(exc)


def short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
