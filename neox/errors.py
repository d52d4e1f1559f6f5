"""Errors a user can cause. Entry points print them on one line and exit 2.

Every message names the file, key or value at fault and what was expected, e.g.
``configs/x.yml: num_layers: expected a positive integer, got -3``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class NeoXError(Exception):
    """Base of the user-facing errors; ``str(err)`` is the whole one-line message."""

    exit_code = 2


class ConfigError(NeoXError):
    """A config file, key or value is wrong (unknown key, bad type, sizes that don't divide)."""


class DataError(NeoXError):
    """A data file or tokenizer is missing, corrupt or inconsistent with the config."""


class CheckpointError(NeoXError):
    """A checkpoint is missing, corrupt, or does not match the model or parallel layout."""


def format_error(err: BaseException) -> str:
    """The one line printed for ``err``: ``neox: error: <message>``."""
    msg = " ".join(str(err).split()) or type(err).__name__
    return f"neox: error: {msg}"


def exit_code_of(main: Callable[[], int | None]) -> int:
    """Run an entry point's ``main``: a NeoXError becomes its one line on stderr and exit code 2.

    ``NEOX_DEBUG=1`` re-raises instead, to show the traceback.
    """
    try:
        return main() or 0
    except NeoXError as err:
        if os.environ.get("NEOX_DEBUG") == "1":
            raise
        print(format_error(err), file=sys.stderr)
        return err.exit_code
