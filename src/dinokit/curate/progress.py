"""The curation stages' progress bars: `dinokit.progress` (shared with the dense head training loop)."""

from dinokit.progress import Silent, bars

__all__ = ["Silent", "bars"]
