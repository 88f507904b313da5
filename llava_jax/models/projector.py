"""Projector from vision features to the decoder's embedding space."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.config import LoraConfig
from llava_jax.models.layers import activation, dense

Array = jax.Array


class Projector(nn.Module):
    """`features: [..., D_vision * n_feature_layers]` -> `[..., D_text]`.

    `linear` is one dense layer `fc` (LLaVA-1); `mlp{N}x_gelu` is N dense layers
    `fc1 … fcN` with the activation between them (LLaVA-1.5: N=2, exact GELU).
    """

    depth: int  # dense layers; 0 = identity
    out_features: int
    use_bias: bool = True
    act: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, features: Array) -> Array:
        kw = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora
        )
        x = features.astype(self.dtype)
        if self.depth == 1:
            return dense(self.out_features, ("embed", "mlp"), name="fc", **kw)(x)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = activation(self.act)(x)
            # Alternate the sharded input axis so two consecutive kernels never repeat a name.
            axes = ("embed", "mlp") if i % 2 else ("mlp", "embed")
            x = dense(self.out_features, axes, name=f"fc{i}", **kw)(x)
        return x
