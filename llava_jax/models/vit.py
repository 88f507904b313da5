"""CLIP vision transformer (pre-LN blocks, quick_gelu MLP), as in transformers' CLIPVisionModel."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.config import VisionConfig
from llava_jax.models.layers import (
    Attention,
    activation,
    dense,
    layer_norm,
    make_layer_stack,
    run_layer_stack,
)

Array = jax.Array


class VisionBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)). Emits its output as the per-layer hidden state."""

    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, _per_layer: None) -> tuple[Array, Array]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layer_norm(cfg.layer_norm_eps, name="attn_norm", **kw)(x)
        h, _ = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            use_bias=True,
            name="attn",
            **kw,
        )(h)
        x = x + h
        h = layer_norm(cfg.layer_norm_eps, name="mlp_norm", **kw)(x)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h)
        h = activation(cfg.hidden_act)(jax.ad_checkpoint.checkpoint_name(h, "mlp_hidden"))
        h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, name="fc2", **kw)(h)
        x = x + jax.ad_checkpoint.checkpoint_name(h, "mlp_out")
        return x, x


class VisionTransformer(nn.Module):
    """CLIP ViT. `images: float32[N, H, W, C]` (normalised) -> hidden states of every layer.

    Returns `(embeddings, layer_outputs, pooled)`: `embeddings: [N, P+1, D]` is hidden state 0
    (after the pre-norm), `layer_outputs: [L, N, P+1, D]` are hidden states 1..L before the
    post-norm, numbered as transformers' `hidden_states`; `pooled: [N, D]` is CLIP's post-normed
    CLS state. LLaVA uses neither the post-norm nor `pooled` (XLA drops it), but the weights
    stay so they can be exchanged with transformers.
    """

    config: VisionConfig
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = PatchEmbedding(cfg, **kw)
        self.pre_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.layers = make_layer_stack(
            VisionBlock,
            num_layers=cfg.num_layers,
            scan=self.scan_layers,
            remat=self.remat_policy,
            num_broadcast=0,
            config=cfg,
            **kw,
        )
        self.post_norm = layer_norm(cfg.layer_norm_eps, **kw)

    def __call__(self, images: Array) -> tuple[Array, Array, Array]:
        x = self.pre_norm(self.embedding(images))
        _, layer_outputs = run_layer_stack(self.layers, x, None)
        return x, layer_outputs, self.post_norm(layer_outputs[-1][:, 0])


class PatchEmbedding(nn.Module):
    """Non-overlapping patch conv (no bias), a class token, learned positions."""

    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        patches = nn.Conv(
            features=cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, None, "embed")
            ),
            name="patch",
        )(images.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        cls = self.param(
            "cls",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (cfg.hidden_size,),
            self.param_dtype,
        )
        positions = self.param(
            "pos",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (cfg.num_patches + 1, cfg.hidden_size),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + positions.astype(self.dtype)[None]
