"""The one exception type that the CLI turns into a single clear line and exit code 2."""


class ProckdError(Exception):
    """A user-facing error: bad config, missing file, unknown model, bad tap path, ..."""
