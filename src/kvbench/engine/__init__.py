"""Generation with per-token timing."""

from kvbench.engine.generate import GenerationConfig, GenerationResult, generate
from kvbench.engine.sampling import SamplingConfig

__all__ = ["GenerationConfig", "GenerationResult", "SamplingConfig", "generate"]
