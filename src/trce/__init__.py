"""trce: reliable concept erasure for text-to-image diffusion models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["TrceError", "__version__", "load_pipeline"]


def __getattr__(name: str):
    # Lazy, so `import trce` stays cheap and free of side effects (no torch import at startup).
    if name == "load_pipeline":
        from trce.loading import load_pipeline

        return load_pipeline
    if name == "TrceError":
        from trce.errors import TrceError

        return TrceError
    raise AttributeError(name)
