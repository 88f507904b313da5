"""llava_jax: LLaVA in JAX/Flax — a CLIP vision tower, a projector and a LLaMA decoder."""

__version__ = "0.1.0"
