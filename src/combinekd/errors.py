"""The error types the CLI turns into a one-line message and exit code 2 (3 for a process that stopped
because another failed), and warnings."""

import sys


class UserError(Exception):
    """A problem with the user's input or environment (bad corpus, bad config, missing file)."""


class PeerStopped(UserError):
    """This process of a several-process run stops because another one failed (whose error is the cause):
    exit code 3 instead of 2, so that a launcher can tell the cause from its consequences."""

    exit_code = 3


def warn(message: str) -> None:
    """One line on stderr about something the user should know, though the command goes on."""
    print(f"combinekd: warning: {message}", file=sys.stderr, flush=True)
