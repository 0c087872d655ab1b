"""The pipeline's error type and the command-line wrapper that turns errors into one clear message."""
from __future__ import annotations

import sys
from collections.abc import Callable


class DataPipelineError(Exception):
    """Bad input or configuration. The message names the problem and how to fix it."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a command's `main`; print known failures as `error: ...` (no traceback) and return the exit code."""
    try:
        main(argv)
    except DataPipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Unreadable or unwritable paths (permissions, full disk) are user-fixable, not bugs.
        print(f"error: {e.strerror or e} ({e.filename or 'no file name'})", file=sys.stderr)
        return 2
    return 0
