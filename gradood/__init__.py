"""gradood: out-of-distribution detection from per-layer gradient norms of deep generative models."""

__version__ = "0.1.0"
