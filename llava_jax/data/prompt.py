"""How a prompt becomes tokens, the same for training's held-out questions and for inference.

A conversation (LLaVA's `{"from": "human"|"gpt", "value": ...}` turns) is rendered with the
template up to where the assistant's next answer starts, tokenized as training tokenizes it
(data/conversation.py: these tokens are exactly the start of the training row), and every
`<image>` is expanded to the number of image tokens the model gives an image. Imports
neither grain nor TFDS, so inference does not load the training input pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llava_jax.data.conversation import (
    IMAGE_PLACEHOLDER,
    Template,
    encode_rendered,
    image_token_repeats,
)
from llava_jax.data.tokenizer import LoadedTokenizer


def prompt_ids(
    turns: Sequence[dict],
    template: Template,
    tokenizer: LoadedTokenizer,
    num_image_tokens: int | Sequence[int],
) -> np.ndarray:
    """`int32[L]`: the conversation rendered with `template`, ending where the assistant's
    next answer starts, tokenized, each `<image>` expanded (`num_image_tokens` each, or one
    count per image in order). Raises `DroppedExample` when the roles are out of order or
    the text holds a reserved character."""
    rendered = template.render(turns, generation_prompt=True)
    ids = encode_rendered(rendered, tokenizer, template.version)
    return np.repeat(ids, image_token_repeats(ids, tokenizer.image_token_id, num_image_tokens))


def user_turn(text: str, with_image: bool) -> dict:
    """A human turn; with an image, `<image>\\n` comes first, as LLaVA's CLIs do."""
    if with_image and IMAGE_PLACEHOLDER not in text:
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    return {"from": "human", "value": text}
