"""LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llava_jax.models.config import LoraConfig, TextConfig
from llava_jax.models.layers import (
    Attention,
    RMSNorm,
    activation,
    dense,
    make_layer_stack,
    run_layer_stack,
)

Array = jax.Array
# k: [L, B, K, D, S], v: [L, B, K, S, D] (`init_cache`); mask int32[B, S]; index int32[] (the
# next slot of every row) or int32[B] (each row's own)
KVCache = dict[str, Any]


def init_cache(
    config: TextConfig, batch_size: int, max_length: int, dtype: Any, per_layer: bool = False
) -> KVCache:
    """An empty KV cache for `batch_size` sequences of up to `max_length` tokens.

    Heads-major, in the layouts `cache_attention`'s matmuls read as they are: keys
    transposed, `k: [L, B, K, D, S]`, values `v: [L, B, K, S, D]`, one stacked buffer each
    (for scanned layers, whose carry it is), or with `per_layer` (unscanned layers) a tuple
    of L buffers each, which every layer updates and reads in place (a stacked buffer's
    layer is copied out to be read).
    """
    batch, heads, head_dim = batch_size, config.num_kv_heads, config.resolved_head_dim
    shapes = {"k": (batch, heads, head_dim, max_length), "v": (batch, heads, max_length, head_dim)}
    layers = config.num_layers
    if per_layer:
        buffers = {n: tuple(jnp.zeros(s, dtype) for _ in range(layers)) for n, s in shapes.items()}
    else:
        buffers = {n: jnp.zeros((layers, *s), dtype) for n, s in shapes.items()}
    return {
        **buffers,
        "mask": jnp.zeros((batch_size, max_length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def write_rows(buffer: Array, rows: Array, index: Array) -> Array:
    """`buffer: [B, S]` with `rows: [B, T]` written at slot `index` (int32[]), or each row at
    its own (int32[B])."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, rows, (0, index))
    return jax.vmap(lambda row, new, i: jax.lax.dynamic_update_slice(row, new, (i,)))(
        buffer, rows, index
    )


def causal_padding_mask(query_slots: Array, key_valid: Array) -> Array:
    """bool[B, T, S]: key slot s is visible from query slot t if s <= t and s holds a token.

    query_slots: int32[T] or [B, T] (each row its own), the slots of the queries in the key
    buffer; key_valid: [B, S].
    """
    key_slots = jnp.arange(key_valid.shape[1])
    query_slots = jnp.atleast_2d(query_slots)
    causal = key_slots[None, None, :] <= query_slots[:, :, None]
    return causal & (key_valid[:, None, :] > 0)


class DecoderBlock(nn.Module):
    """x + attn(norm(x)), then x + swiglu(norm(x)).

    Over a whole sequence the carry is `x`, and `segment_ids: int32[B, T]` marks the real
    tokens (`cache_mask` is None). With a KV cache the carry is `(x, cache)`: the whole
    cache (`init_cache`: stacked buffers, or one per layer) passes from layer to layer, each
    layer writing its new keys and values into its own part (`layer`: this block's index,
    the per-layer input), so the cache is updated in place, never copied whole;
    `cache_mask: bool[B, T, S]`
    says which slots each query sees.
    """

    config: TextConfig
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        carry: Array | tuple[Array, dict[str, Array]],
        layer: Array | None,
        segment_ids: Array | None,
        cache_mask: Array | None,
        positions: Array,
        cache_index: Array | None,
    ) -> tuple[Array | tuple[Array, dict[str, Array]], None]:
        cfg = self.config
        x, cache = carry if isinstance(carry, tuple) else (carry, None)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_norm_eps, name="attn_norm", **kw)(x)
        h, cache = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.resolved_head_dim,
            causal=True,
            use_bias=cfg.attention_bias,
            qkv_bias=cfg.qkv_bias,
            rope=cfg.rope,
            implementation=self.attention,
            lora=self.lora,
            name="attn",
            **kw,
        )(h, positions, segment_ids, cache, cache_index, cache_mask, cache_layer=layer)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="mlp_norm", **kw)(x)
        mlp = dict(use_bias=cfg.mlp_bias, lora=self.lora, **kw)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate", **mlp)(h)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up", **mlp)(h)
        gate, up = checkpoint_name(gate, "mlpwi"), checkpoint_name(up, "mlpwi")
        h = dense(cfg.hidden_size, ("mlp", "embed"), name="down", **mlp)(
            activation(cfg.hidden_act)(gate) * up
        )
        x = x + checkpoint_name(h, "mlpwo")
        return (x if cache is None else (x, cache)), None


class LlamaDecoder(nn.Module):
    """Token embedding, decoder blocks, final norm, LM head (or the tied embedding)."""

    config: TextConfig
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            **kw,
        )
        self.layers = make_layer_stack(
            DecoderBlock,
            num_layers=cfg.num_layers,
            scan=self.scan_layers,
            remat=self.remat_policy,
            num_broadcast=4,
            config=cfg,
            attention=self.attention,
            lora=self.lora,
            **kw,
        )
        self.final_norm = RMSNorm(cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), lora=self.lora, **kw)

    def embed_tokens(self, input_ids: Array) -> Array:
        """`input_ids: int32[B, T]` -> `[B, T, D]` in compute dtype."""
        return self.embed(input_ids)

    def __call__(
        self,
        embeddings: Array,
        positions: Array,
        attention_mask: Array,
        cache: KVCache | None = None,
        last_position_only: bool = False,
        return_hidden: bool = False,
    ) -> tuple[Array, KVCache | None]:
        """Run the decoder on `embeddings: [B, T, D]` at `positions: int32[B, T]`.

        Without a cache, `attention_mask: int32[B, T]` gives each token's segment (0 =
        padding) and attention is causal within each segment. With a cache, the T inputs
        are written at `cache['index']`, `attention_mask` marks which of them are real, and
        attention runs over the buffer.
        Returns `(logits float32[B, T, V], new cache or None)`; with `last_position_only`,
        logits `[B, 1, V]` of the last position (a prefill needs no more, and full logits
        of a long multimodal prompt would dominate its memory). With `return_hidden`, the
        final-normed hidden states `[B, T, D]` instead of logits (see `logits`).
        """
        length = embeddings.shape[1]
        if cache is None:
            x, _ = run_layer_stack(
                self.layers, embeddings, None, attention_mask, None, positions, None
            )
            new_cache = None
        else:
            index = cache["index"]  # int32[], or int32[B]: each row its own slot
            key_valid = write_rows(cache["mask"], attention_mask.astype(jnp.int32), index)
            mask = causal_padding_mask(index[..., None] + jnp.arange(length), key_valid)
            # The k/v buffers are the layers' carry; each layer gets its index.
            layer_ids = np.arange(self.config.num_layers, dtype=np.int32)
            kv = {"k": cache["k"], "v": cache["v"]}
            (x, kv), _ = run_layer_stack(
                self.layers, (embeddings, kv), layer_ids, None, mask, positions, index
            )
            new_cache = {**kv, "mask": key_valid, "index": index + length}
        if last_position_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def logits(self, hidden: Array) -> Array:
        """The LM head: final-normed `hidden: [B, T, D]` -> `float32[B, T, V]`."""
        tied = self.config.tie_word_embeddings
        logits = self.embed.attend(hidden) if tied else self.lm_head(hidden)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)
