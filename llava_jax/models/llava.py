"""LLaVA: vision tower -> feature selection -> projector -> features merged into the text.

`Llava(config).apply({"params": params}, input_ids, images, image_mask, attention_mask)`
gives `float32[B, T, V]` logits. The image features take, in order, the positions where
`input_ids == config.image_token_id`; shapes are static, so one compiled step serves every
batch. The parameter tree has three towers: `img`, `proj`, `llm` (docs/design.md).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.config import ModelConfig
from llava_jax.models.inputs import ImageGeometry, batch_shapes
from llava_jax.models.layers import stack_layers, unstack_layers
from llava_jax.models.llama import KVCache, LlamaDecoder
from llava_jax.models.lora import prepare_base, prepare_base_abstract
from llava_jax.models.projector import Projector
from llava_jax.models.vit import VisionTransformer

Array = jax.Array


def feature_states(config: ModelConfig) -> tuple[int, ...]:
    """The vision hidden-state indices (0..L) that `config.vision_feature_layer` selects."""
    num_states = config.vision.num_layers + 1
    return tuple(layer % num_states for layer in config.feature_layers)


def select_features(config: ModelConfig, states: dict[int, Array]) -> Array:
    """The selected vision hidden states `{index: [N, T, D]}`, concatenated on features.

    Returns [N, P or T, D * n_layers] (CLS dropped under the `default` strategy; T is P+1
    with CLIP's class token, P for SigLIP, which has none and takes `full`).
    """
    picked = []
    for index in feature_states(config):
        state = states[index]
        if config.vision_feature_select_strategy == "default":
            state = state[:, 1:]
        picked.append(state)
    return jnp.concatenate(picked, axis=-1)


def merge_image_features(
    text_embeddings: Array,
    image_features: Array,
    is_image_token: Array,
    image_mask: Array,
    feature_mask: Array | None = None,
) -> Array:
    """Put image features at the image-token positions, in order.

    text_embeddings: [B, T, D]; image_features: [B, I, N, D]; is_image_token: bool[B, T];
    image_mask: bool[B, I]; feature_mask: bool[B, I, N], which of an image's N features it
    has (LLaVA-NeXT: the count depends on the image's size; default all). The k-th image
    token of a sample takes the k-th feature of its valid images taken in order, so a
    sample's image tokens must number its valid images' features.
    """
    batch, num_images, per_image, width = image_features.shape
    valid = jnp.broadcast_to(image_mask[:, :, None], (batch, num_images, per_image))
    if feature_mask is not None:
        valid = valid & feature_mask
    # Valid features first, keeping their order, so masked-out ones are never read.
    flat = image_features.reshape(batch, num_images * per_image, width)
    order = jnp.argsort(~valid.reshape(batch, -1), axis=1, stable=True)
    features = jnp.take_along_axis(flat, order[:, :, None], axis=1)
    feature_index = jnp.clip(jnp.cumsum(is_image_token, axis=1) - 1, 0, num_images * per_image - 1)
    gathered = jnp.take_along_axis(features, feature_index[..., None], axis=1)
    return jnp.where(
        is_image_token[..., None], gathered.astype(text_embeddings.dtype), text_embeddings
    )


def lay_out_anyres(features: Array, newline: Array, layout: Array) -> tuple[Array, Array]:
    """LLaVA-NeXT's feature order from tile features (`ImageGeometry.feature_layout`).

    features: [B, I, T, P, D] (tile 0 the overview); newline: [D]; layout: int32[B, I, N],
    rows of each image's table `[T * P + 1]` (the last: the newline), -1 past its tokens.
    Returns the image's features in token order `[B, I, N, D]` and which exist `bool[B, I, N]`.
    """
    batch, num_images, tiles, per_tile, width = features.shape
    table = features.reshape(batch, num_images, tiles * per_tile, width)
    row = jnp.broadcast_to(newline.astype(table.dtype), (batch, num_images, 1, width))
    table = jnp.concatenate([table, row], axis=2)
    if layout.ndim == 4:  # OneVision's blended layout: 4 rows and their weights a token
        return _blend(table, layout)
    laid = jnp.take_along_axis(table, jnp.maximum(layout, 0)[..., None], axis=2)
    return laid, layout >= 0


def _blend(table: Array, layout: Array) -> tuple[Array, Array]:
    """table: [B, I, R, D]; layout: int32[B, I, N, 8] (`models/inputs.py` `blend_layout`) ->
    each token's weighted sum of its 4 rows `[B, I, N, D]`, and which exist `bool[B, I, N]`."""
    batch, num_images, tokens = layout.shape[:3]
    taps = layout.shape[-1] // 2
    rows, bits = layout[..., :taps], layout[..., taps:]
    exists = rows[..., 0] >= 0
    # Past an image's tokens the weights' bits are -1 (NaN): zero them, or NaN gradients
    # would reach the features through the unused tokens.
    weights = jnp.where(rows >= 0, jax.lax.bitcast_convert_type(bits, jnp.float32), 0.0)
    flat_rows = jnp.maximum(rows, 0).reshape(batch, num_images, tokens * taps)
    gathered = jnp.take_along_axis(table, flat_rows[..., None], axis=2)
    gathered = gathered.reshape(batch, num_images, tokens, taps, table.shape[-1])
    # A product and a sum, not a matmul: the weights keep the table's precision on any chip.
    blended = jnp.sum(gathered * weights[..., None].astype(table.dtype), axis=3)
    return blended, exists


class Llava(nn.Module):
    """The three towers (`img`, `proj`, `llm`) and the merge of image features into text."""

    config: ModelConfig

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry.of(self.config)

    def setup(self):
        cfg = self.config
        lora = cfg.lora if cfg.lora.enabled else None
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), lora=lora)
        stack = dict(
            scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy, attention=cfg.attention
        )
        self.img = VisionTransformer(cfg.vision, **stack, **kw)
        self.proj = Projector(
            depth=cfg.projector_depth,
            out_features=cfg.text.hidden_size,
            use_bias=cfg.projector_bias,
            act=cfg.projector_act,
            newline=self.geometry.tiled,
            **kw,
        )
        self.llm = LlamaDecoder(cfg.text, **stack, **kw)

    def encode_images(self, images: Array, layout: Array | None) -> tuple[Array, Array | None]:
        """`images: float32[B, I, T, H, W, 3]` (each image's tiles, normalised) and `layout:
        int32[B, I, N]` -> features `[B, I, N, D_text]` in token order and which exist
        `bool[B, I, N]` (`lay_out_anyres`). Images of one tile (LLaVA-1.5) are already in
        token order: their layout is not read and every feature exists (None)."""
        if images.ndim != 6:
            raise ValueError(
                f"images must be float32[B, I, T, H, W, 3] (each image's tiles; one for a "
                f"square image), got shape {images.shape}"
            )
        batch, num_images, tiles = images.shape[:3]
        flat = images.reshape(batch * num_images * tiles, *images.shape[3:])
        with jax.named_scope("vision"):
            selected = select_features(self.config, self.img(flat, feature_states(self.config)))
            if not self.geometry.tiled:  # static: one tile an image, no gather
                features = self.proj(selected)
                return features.reshape(batch, num_images, *features.shape[1:]), None
            features, newline = self.proj(selected, True)
        features = features.reshape(batch, num_images, tiles, *features.shape[1:])
        return lay_out_anyres(features, newline, self.geometry.check_layout(layout))

    def embed_inputs(
        self,
        input_ids: Array,
        images: Array | None,
        image_mask: Array | None,
        image_layout: Array | None = None,
    ) -> Array:
        """Token embeddings `[B, T, D]` with image features at the image-token positions."""
        features, exists = None, None
        if images is not None:
            features, exists = self.encode_images(images, image_layout)
        return self.embed_with_features(input_ids, features, image_mask, exists)

    def embed_with_features(
        self,
        input_ids: Array,
        features: Array | None,
        image_mask: Array | None,
        feature_mask: Array | None = None,
    ) -> Array:
        """`embed_inputs` from image features already computed (`encode_images`'s: `[B, I,
        N, D]`, which exist `bool[B, I, N]` or None for all; e.g. kept from an earlier
        request about the same image)."""
        is_image_token = jnp.isin(input_ids, jnp.asarray(self.config.media_token_ids))
        # The image token may lie outside the vocabulary; its embedding is replaced anyway.
        embeddings = self.llm.embed_tokens(jnp.where(is_image_token, 0, input_ids))
        if features is None:
            return embeddings
        if image_mask is None:
            image_mask = jnp.ones(features.shape[:2], dtype=bool)
        return merge_image_features(embeddings, features, is_image_token, image_mask, feature_mask)

    def __call__(
        self,
        input_ids: Array,
        images: Array | None = None,
        image_mask: Array | None = None,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        return_hidden: bool = False,
        image_layout: Array | None = None,
    ) -> Array:
        """Full forward pass -> logits `float32[B, T, V]`.

        input_ids: int32[B, T]; images: float32[B, I, T_img, H, W, 3] (each image's tiles;
        models/inputs.py); image_mask: bool[B, I]
        (default all True); attention_mask: int32[B, T], 0 = padding, else the token's
        segment (default all 1): a row may pack several sequences, numbered 1, 2, ..., that
        never attend to each other; positions: int32[B, T] (default 0..T-1 in every row, as
        transformers' forward; packed rows restart them at each segment). The image
        features fill a row's image tokens in order, whatever segments they belong to.
        `image_layout: int32[B, I, N]` (`ImageGeometry.feature_layout`): read for tiled
        images (LLaVA-NeXT) only.
        `return_hidden`: the decoder's final-normed hidden states `[B, T, D]` instead, for a
        loss that applies the LM head (`logits`) in chunks.
        """
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        embeddings = self.embed_inputs(input_ids, images, image_mask, image_layout)
        out, _ = self.llm(embeddings, positions, attention_mask, return_hidden=return_hidden)
        return out

    def logits(self, hidden: Array) -> Array:
        """The LM head on final-normed hidden states `[B, T, D]` -> `float32[B, T, V]`."""
        return self.llm.logits(hidden)

    def decode(
        self,
        input_ids: Array,
        cache: KVCache,
        images: Array | None = None,
        image_mask: Array | None = None,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        last_position_only: bool = False,
        image_layout: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Append `input_ids: int32[B, t]` to the KV cache -> (logits `float32[B, t, V]`, cache).

        Prefill passes the prompt (and its images); each later step passes one token. By
        default a token's position counts the real tokens before it, so left-padded prompts
        get the positions transformers' `generate` gives them. `last_position_only`: logits
        `[B, 1, V]` of the last position only.
        """
        embeddings = self.embed_inputs(input_ids, images, image_mask, image_layout)
        return self.decode_embedded(
            embeddings, cache, attention_mask, positions, last_position_only
        )

    def decode_embedded(
        self,
        embeddings: Array,
        cache: KVCache,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        last_position_only: bool = False,
    ) -> tuple[Array, KVCache]:
        """`decode` from token embeddings `[B, t, D]` (`embed_inputs`'s, images merged): a
        prompt prefilled in chunks embeds it once, then appends it chunk by chunk."""
        batch, length = embeddings.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            seen = jnp.sum(cache["mask"], axis=1, keepdims=True)
            positions = jnp.maximum(seen + jnp.cumsum(attention_mask, axis=1) - 1, 0)
        return self.llm(
            embeddings, positions.astype(jnp.int32), attention_mask, cache, last_position_only
        )


# --- parameter trees ------------------------------------------------------------------------


def dummy_inputs(config: ModelConfig, batch_size: int = 1) -> dict[str, Array]:
    """Smallest inputs that reach every parameter, in the input contract's shapes
    (`models/inputs.py`): one image slot and its image tokens (a tiled image: the first of
    its layout's rows, the rest -1)."""
    length = config.num_image_tokens + 1
    shapes = batch_shapes(config, batch_size, length, image_slots=1)
    input_ids = jnp.full(shapes["input_ids"][0], config.image_token_id, jnp.int32)
    layout_shape = shapes["image_layout"][0]
    geometry = ImageGeometry.of(config)
    if geometry.blended:  # OneVision: an image of several, a tile's features in order
        layout = geometry.several_layout()
    else:
        rows = jnp.arange(geometry.max_tokens, dtype=jnp.int32)
        layout = jnp.where(rows < config.num_image_tokens, rows, -1)
    return {
        "input_ids": input_ids.at[:, -1].set(0),
        "images": jnp.zeros(*shapes["images"]),
        "image_layout": jnp.broadcast_to(layout, layout_shape),
    }


def _for_init(config: ModelConfig) -> ModelConfig:
    """Parameters do not depend on the attention implementation; shape them with the
    reference, which runs anywhere (a kernel may not run where this is traced)."""
    return dataclasses.replace(config, attention="xla")


def abstract_params(config: ModelConfig, *, stored: bool = True) -> dict:
    """The parameter tree as `nn.Partitioned`-boxed `ShapeDtypeStruct`s (no memory used),
    with a LoRA model's frozen base as `lora.base_dtype` stores it (models/lora.py), or,
    `stored=False`, as the model initialises it (float kernels)."""
    inputs = dummy_inputs(config)
    variables = jax.eval_shape(lambda: Llava(_for_init(config)).init(jax.random.key(0), **inputs))
    if not stored:
        return variables["params"]
    return prepare_base_abstract(config, variables["params"])


def init_params(config: ModelConfig, rng: Array) -> dict:
    """Randomly initialised parameters (unboxed), e.g. for a projector trained from scratch."""
    inputs = dummy_inputs(config)
    model = Llava(_for_init(config))
    init = jax.jit(lambda rng: model.init(rng, **inputs))
    return prepare_base(config, nn.meta.unbox(init(rng)["params"]))


def lm_head_kernel(config: ModelConfig, params: dict) -> Array:
    """The LM head as a `[D, V]` matrix: `llm/lm_head/kernel`, or the tied embedding."""
    if config.text.tie_word_embeddings:
        return params["llm"]["embed"]["embedding"].T
    return params["llm"]["lm_head"]["kernel"]


_STACKED_TOWERS = {"img": "vision", "llm": "text"}


def to_scan_layout(params: dict, config: ModelConfig) -> dict:
    """Unscanned tree (`layers_{i}`) -> scanned tree (`layers` with a leading layer axis)."""
    out = dict(params)
    for tower, sub in _STACKED_TOWERS.items():
        if tower in out and "layers" not in out[tower]:
            out[tower] = stack_layers(out[tower], getattr(config, sub).num_layers)
    return out


def to_unscanned_layout(params: dict, config: ModelConfig) -> dict:
    """Scanned tree -> unscanned tree; the inverse of `to_scan_layout`."""
    out = dict(params)
    for tower, sub in _STACKED_TOWERS.items():
        if tower in out and "layers" in out[tower]:
            out[tower] = unstack_layers(out[tower], getattr(config, sub).num_layers)
    return out
