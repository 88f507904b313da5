"""Weight exchange with Hugging Face: safetensors read and written with numpy, no torch."""

from llava_jax.convert.hf import load_hf, load_towers, save_hf
from llava_jax.convert.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_hf", "load_towers", "save_hf"]
