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
    `fc1 … fcN` with the activation between them (LLaVA-1.5: N=2, exact GELU). With
    `newline` (LLaVA-NeXT) it also holds `image_newline: [D_text]`, the embedding that closes
    each row of an image's feature map, returned beside the features on `with_newline`.
    """

    depth: int  # dense layers; 0 = identity
    out_features: int
    use_bias: bool = True
    act: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    newline: bool = False

    @nn.compact
    def __call__(self, features: Array, with_newline: bool = False) -> Array | tuple[Array, Array]:
        kw = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora
        )
        x = features.astype(self.dtype)
        if self.depth == 1:
            x = dense(self.out_features, ("embed", "mlp"), name="fc", **kw)(x)
        else:
            for i in range(1, self.depth + 1):
                if i > 1:
                    x = activation(self.act)(x)
                # Alternate the sharded input axis so consecutive kernels never repeat a name.
                axes = ("embed", "mlp") if i % 2 else ("mlp", "embed")
                x = dense(self.out_features, axes, name=f"fc{i}", **kw)(x)
        if not self.newline:
            return x
        newline = self.param(
            "image_newline",
            nn.with_logical_partitioning(
                nn.initializers.normal(1 / self.out_features**0.5), ("embed",)
            ),
            (self.out_features,),
            self.param_dtype,
        )
        return (x, newline.astype(self.dtype)) if with_newline else x
