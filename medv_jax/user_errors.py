"""Mistakes in what a user gave a command: one line naming the item and what to do, exit status 2.

Every command declares its flags with :class:`CommandParser` and runs its body through
:func:`run_command`. Code anywhere below a command raises :class:`UserError` for a mistake in
its input (a flag, a file, a config field); ``run_command`` prints it as
``<command>: error: <message>`` on one line and returns 2. Any other exception is a bug in the
program and keeps its traceback; ``--debug`` shows the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"


class UserError(ValueError):
    """A mistake in what the user gave; the message names the item and says what to do."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` spelled most like ``name`` (for "did you mean" hints)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:  # a misspelt leaf keeps its last part: "lr_rate" still finds "lr"
        leaf = name.rsplit(".", 1)[-1]
        found = [c for c in candidates if c.rsplit(".", 1)[-1] in leaf or leaf in c.rsplit(".", 1)[-1]][:n]
    return found


def command_name(module: str) -> str:
    """How the user started the command: ``python -m`` and the module they named.

    ``python -m pkg.mod`` sets ``sys.argv[0]`` to the module's file, which maps back to the dotted
    name (``pkg/mod/__main__.py`` -> ``pkg.mod``). Elsewhere (called in process) ``module``."""
    argv0 = sys.argv[0] if sys.argv else ""
    top = module.split(".")[0]
    if argv0.endswith(".py") and os.path.isfile(argv0):
        path = Path(argv0).resolve()
        parts = [path.stem]
        folder = path.parent
        while (folder / "__init__.py").is_file():
            parts.insert(0, folder.name)
            folder = folder.parent
        if parts[-1] == "__main__":
            parts.pop()
        if parts and parts[0] == top:
            module = ".".join(parts)
    return f"python -m {module}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already states its default, or
    the default is nothing to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and with ``--debug``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            DEBUG_FLAG, action="store_true", help="show the full traceback of an error in what was given"
        )

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def run_command(
    body: Callable[[list[str]], int | None],
    argv: Sequence[str] | None,
    module: str,
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """``body(argv)`` with a :class:`UserError` (or one of ``user_errors``) printed as one line and
    exit status 2; the traceback only with ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(argv) or 0
    except (UserError, *user_errors) as e:
        if DEBUG_FLAG in argv:
            raise
        print(f"{command_name(module)}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def existing_path(flag: str, path: str, kind: str = "file") -> str:
    """``path`` expanded; a UserError naming ``flag`` unless it is an existing file (``kind="file"``)
    or folder (``kind="folder"``)."""
    full = os.path.expanduser(path)
    if not path:
        raise UserError(f"{flag} is empty: give a {kind}")
    if kind == "folder":
        if os.path.isfile(full):
            raise UserError(f"{flag} {path!r} is a file: give a folder")
        if not os.path.isdir(full):
            raise UserError(f"{flag} {path!r}: no such folder")
    else:
        if os.path.isdir(full):
            raise UserError(f"{flag} {path!r} is a folder: give a file")
        if not os.path.isfile(full):
            raise UserError(f"{flag} {path!r}: no such file")
    return full
