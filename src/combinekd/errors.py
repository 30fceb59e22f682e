"""The one error type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with the user's input or environment (bad corpus, bad config, missing file)."""
