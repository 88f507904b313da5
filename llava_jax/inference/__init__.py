"""Inference: generation with a KV cache (on-device decode loop, sampling, streaming)."""

from llava_jax.inference.generate import (
    GenerationResult,
    Generator,
    PreparedBatch,
    SamplingConfig,
    default_length_bucket,
    filter_logits,
)

__all__ = [
    "GenerationResult",
    "Generator",
    "PreparedBatch",
    "SamplingConfig",
    "default_length_bucket",
    "filter_logits",
]
