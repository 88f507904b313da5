"""Inference: sampling settings and token selection (`sampling`), a pure prefill and decode
loop with a KV cache (`programs`), the host-side engine (`engine`) and its runs
(`generation`), and loading a model for it (`load`) from a workdir, a Hugging Face directory
or a params checkpoint (`checkpoints`)."""

from llava_jax.errors import InputError, PromptTooLongError
from llava_jax.inference.engine import Engine, default_length_bucket
from llava_jax.inference.generation import GenerationResult, GenerationStream
from llava_jax.inference.programs import DecodeState
from llava_jax.inference.sampling import SamplingConfig, filter_logits

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
