"""Inference: a pure prefill and decode loop with a KV cache (`engine`), and loading a model
for it from a workdir, a Hugging Face directory or a params checkpoint (`load`)."""

from llava_jax.errors import InputError, PromptTooLongError
from llava_jax.inference.engine import (
    DecodeState,
    Engine,
    GenerationResult,
    GenerationStream,
    SamplingConfig,
    default_length_bucket,
    filter_logits,
)

__all__ = [
    "DecodeState",
    "Engine",
    "GenerationResult",
    "GenerationStream",
    "InputError",
    "PromptTooLongError",
    "SamplingConfig",
    "default_length_bucket",
    "filter_logits",
]
