"""Progress bars for long stages (curation, dense head training): tqdm on stderr, or nothing (--quiet, and
library calls)."""

from __future__ import annotations

import functools
import sys


class Silent:
    """A bar that shows nothing: the default of every stage function."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def bars(enabled: bool):
    """A bar factory: `bar(total=..., desc=..., unit=...)`, used as a context manager with `.update(n)`."""
    if not enabled:
        return Silent
    from tqdm.auto import tqdm

    return functools.partial(tqdm, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=1.0)
