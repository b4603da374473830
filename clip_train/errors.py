"""The one-line error every command prints for a user's mistake: `<prog>: error: <message>`, exit 2.

except (ConfigError, FileNotFoundError) as e:
    return fail("clip-train", e)
"""

from __future__ import annotations

import re
import sys

EXIT_USER_ERROR = 2


def one_line(error: BaseException) -> str:
    """The message of `error` on one line. An error raised in a DataLoader worker comes back with
    the worker's traceback in its message: its last line is the message itself, after the error's
    class path ("package.module.Error: "). Otherwise the first line says what is wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Traceback (most recent call last)" in str(error):
        return re.sub(r"^(\w+\.)+\w*(Error|Exception): ", "", lines[-1])
    return lines[0]


def fail(prog: str, error: BaseException) -> int:
    """Print `error` as `prog`'s one-line error on stderr; the exit code to return."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return EXIT_USER_ERROR
