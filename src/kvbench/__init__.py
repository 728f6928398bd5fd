"""kvbench: KV-cache strategies for transformer inference, measured and compared."""

__version__ = "0.1.0"
