"""The one exception type that the CLI turns into a single clear line and exit code 2."""


class ProckdError(Exception):
    """A user-facing error: bad config, missing file, unknown model, bad tap path, ..."""


def class_difference(have, want) -> str:
    """How one split's class names differ from another's, naming the classes (at most five of each kind):
    ``missing ['coat'], extra ['zipper']``."""
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))

    def some(names):
        return repr(names[:5])[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5 else "]")

    parts = ([f"missing {some(missing)}"] if missing else []) + ([f"extra {some(extra)}"] if extra else [])
    return ", ".join(parts) or "the same classes in another order"
