"""Pure Flax Linen modules: no I/O, no global state."""

from llava_jax.models.config import ModelConfig, RopeConfig, TextConfig, VisionConfig

__all__ = ["ModelConfig", "RopeConfig", "TextConfig", "VisionConfig"]
