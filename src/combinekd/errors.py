"""The one error type the CLI turns into a one-line message and exit code 2, and warnings."""

import sys


class UserError(Exception):
    """A problem with the user's input or environment (bad corpus, bad config, missing file)."""


def warn(message: str) -> None:
    """One line on stderr about something the user should know, though the command goes on."""
    print(f"combinekd: warning: {message}", file=sys.stderr, flush=True)
