"""CLIP vision transformer (pre-LN blocks, quick_gelu MLP), as in transformers' CLIPVisionModel,
and SigLIP's (`VisionConfig.model_type="siglip"`: transformers' SiglipVisionModel, whose
embeddings differ: no class token, a conv bias, no pre-norm; its pooling head is not built)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llava_jax.models.config import LoraConfig, VisionConfig
from llava_jax.models.layers import (
    Attention,
    activation,
    dense,
    layer_norm,
    make_layer_stack,
    remat_policy,
    run_layer_stack,
)

Array = jax.Array


class VisionBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    config: VisionConfig
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array, _per_layer: None) -> tuple[Array, None]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layer_norm(cfg.layer_norm_eps, name="attn_norm", **kw)(x)
        h, _ = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            causal=False,
            use_bias=True,
            implementation=self.attention,
            lora=self.lora,
            name="attn",
            **kw,
        )(h)
        x = x + h
        h = layer_norm(cfg.layer_norm_eps, name="mlp_norm", **kw)(x)
        mlp = dict(use_bias=True, lora=self.lora, **kw)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **mlp)(h)
        h = activation(cfg.hidden_act)(checkpoint_name(h, "mlpwi"))
        h = dense(cfg.hidden_size, ("mlp", "embed"), name="fc2", **mlp)(h)
        x = x + checkpoint_name(h, "mlpwo")
        return x, None


class VisionTransformer(nn.Module):
    """CLIP or SigLIP ViT. `images: float32[N, H, W, C]` (normalised) -> the hidden states
    asked for.

    Hidden states are numbered as transformers' `hidden_states`: 0 is the embedding (after
    CLIP's pre-norm; SigLIP has none), i the output of layer i, each `[N, T, D]` (T:
    `config.num_tokens`, P+1 with CLIP's class token first, P for SigLIP). Only the layers up to the
    deepest state asked for run (LLaVA's -2 skips the last one), and only the states asked
    for are kept. CLIP's post-norm is never applied by LLaVA, but its weights exist so
    they can be exchanged with transformers (nor is SigLIP's).
    """

    config: VisionConfig
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embedding = PatchEmbedding(cfg, **kw)
        if cfg.has_class_token:  # CLIP's pre-norm ("pre_layrnorm"); SigLIP has none
            self.pre_norm = layer_norm(cfg.layer_norm_eps, **kw)
        self.layers = make_layer_stack(
            VisionBlock,
            num_layers=cfg.num_layers,
            scan=self.scan_layers,
            remat=self.remat_policy,
            num_broadcast=0,
            config=cfg,
            attention=self.attention,
            lora=self.lora,
            **kw,
        )
        self.post_norm = layer_norm(cfg.layer_norm_eps, **kw)

    def __call__(self, images: Array, states: tuple[int, ...]) -> dict[int, Array]:
        """`states`: hidden-state indices in 0..L. Returns {index: [N, T, D]}."""
        num_layers = self.config.num_layers
        if not all(0 <= s <= num_layers for s in states):
            raise ValueError(f"hidden states {states} of a {num_layers}-layer vision tower")
        x = self.embedding(images)
        if self.config.has_class_token:
            x = self.pre_norm(x)
        if self.is_initializing():  # every layer and the post-norm get their parameters
            last, _ = run_layer_stack(self.layers, x, None)
            self.post_norm(last[:, 0])
        kept, done = {}, 0
        for state in sorted(set(states)):
            x = self._run_layers(x, done, state)
            kept[state], done = x, state
        return kept

    def _run_layers(self, x: Array, start: int, stop: int) -> Array:
        """Layers `start .. stop-1` (0-based) on `x: [N, T, D]` -> `[N, T, D]`."""
        if start == stop:
            return x
        if isinstance(self.layers, (list, tuple)):
            for layer in self.layers[start:stop]:
                x, _ = layer(x, None)
            return x
        num_layers = self.config.num_layers
        if (start, stop) == (0, num_layers):
            return self.layers(x, None)[0]
        # A slice of the scanned stack: scan the same block over those layers' parameters.
        # Its Dense layers find their LoRA factors in those parameters (layers.Dense: the
        # free-standing block's paths lack `img/layers/`, so the path rule cannot).
        block = VisionBlock(  # a free-standing module (parent=None), applied to slices
            self.config,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            lora=self.lora,
            parent=None,
        )

        def body(x: Array, layer: tuple[Any, Array | None]) -> tuple[Array, None]:
            params, dropout_rng = layer
            rngs = None if dropout_rng is None else {"dropout": dropout_rng}
            return block.apply({"params": params}, x, None, rngs=rngs)[0], None

        policy = remat_policy(self.remat_policy)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        # Unboxed: at init the stacked leaves are `nn.Partitioned` whose names include the
        # `layers` axis, which the per-layer slices in `body` no longer have.
        params = nn.meta.unbox(self.layers.variables["params"])
        stacked = jax.tree.map(lambda p: p[start:stop], params)
        # The caller's dropout rng (training: LoRA dropout), one key per layer as the scanned
        # stack's `split_rngs` gives; without one the block runs deterministically.
        dropout_rngs = None
        if self.has_rng("dropout"):
            dropout_rngs = jax.random.split(self.make_rng("dropout"), num_layers)[start:stop]
        return jax.lax.scan(body, x, (stacked, dropout_rngs))[0]


class PatchEmbedding(nn.Module):
    """Non-overlapping patch conv, learned positions. CLIP: a conv without bias, a class
    token first, positions for it and the patches; SigLIP: a conv with bias, positions for
    the patches only."""

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
            use_bias=not cfg.has_class_token,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch",
        )(images.astype(self.dtype))
        batch = patches.shape[0]
        x = patches.reshape(batch, -1, cfg.hidden_size)
        if cfg.has_class_token:  # CLIP (created before the positions, as it always was)
            cls = self.param(
                "cls",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (cfg.hidden_size,),
                self.param_dtype,
            )
            cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.hidden_size))
            x = jnp.concatenate([cls, x], axis=1)
        positions = self.param(
            "pos",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (cfg.num_tokens, cfg.hidden_size),
            self.param_dtype,
        )
        return x + positions.astype(self.dtype)[None]
