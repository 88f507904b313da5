"""A conversation and its images -> the prompt a loaded model answers, checked.

`prepare_prompt` is the one way every inference program (`generate`, `chat`, `evaluate`,
the server) makes its prompt: the turns rendered (`LoadedModel.user_turn`: an image's
`<image>\\n` first in its turn, one each when it has several), tokenized with the model's
template (`prompt_ids`, a system prompt in place of the template's own when given; a
OneVision prompt with several images shows each as one tile), checked to hold exactly the
image tokens of its images (`check_image_tokens`) and to leave room for the answer
(`check_prompt`: `max_new_tokens` lowered to what the context leaves, or refused), and the
sampling made with the room there is. It raises about its arguments
(`errors.ArgumentError`): `TurnError` naming the turn whose text cannot be used,
`InputError` about the conversation, `PromptTooLongError` giving the lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from llava_jax.errors import ArgumentError, InputError

if TYPE_CHECKING:
    from llava_jax.inference.load import LoadedModel, Media
    from llava_jax.inference.sampling import SamplingConfig


class TurnError(ArgumentError):
    """A turn of the conversation cannot be used (its text is not valid Unicode, or writes
    `<image>` where no image goes); `turn`: its index in `turns`."""

    def __init__(self, message: str, turn: int) -> None:
        super().__init__("turns", message)
        self.turn = turn


# --- the prompt ----------------------------------------------------------------------------------


class Turn(NamedTuple):
    """One message of a conversation: `role` "user" or "assistant", its text, and whether it
    has an image, or how many (a video counts as one; a user turn only; the prompt's images
    are its turns', in order)."""

    role: str
    text: str
    with_image: bool | int = False


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A checked prompt: `ids` int32[L] (each `<image>` expanded to its image's tokens), its
    `images` (and videos) in prompt order as the prompt shows them (a OneVision prompt with
    several images: each one tile; `LoadedModel.batch_images` stacks them for the engine), the
    new tokens the context leaves room for (at most those asked), and the sampling with
    them (None when none was asked for)."""

    ids: np.ndarray
    images: tuple[Media, ...]
    max_new_tokens: int
    sampling: SamplingConfig | None


def render_turns(model: LoadedModel, turns: Sequence[Turn]) -> list[dict]:
    """LLaVA's turns (`{"from": "human" | "gpt", "value": ...}`) of `turns`; a user turn's
    through `model.user_turn`. Raises `TurnError` naming the turn whose text cannot be used."""
    rendered = []
    for index, turn in enumerate(turns):
        if turn.role not in ("user", "assistant"):
            raise ValueError(f"turn {index}: role {turn.role!r} is not 'user' or 'assistant'")
        if turn.role == "assistant":
            if turn.with_image:
                raise ValueError(f"turn {index}: only a user turn has an image")
            rendered.append({"from": "gpt", "value": turn.text})
            continue
        try:
            rendered.append(model.user_turn(turn.text, turn.with_image))
        except InputError as err:
            raise TurnError(str(err), index) from None
    return rendered


def prepare_prompt(
    model: LoadedModel,
    turns: Sequence[Turn],
    images: Sequence[Media] = (),
    *,
    max_new_tokens: int,
    clamp: bool = True,
    system: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    stop: Sequence[str] = (),
) -> PreparedPrompt:
    """The prompt of the conversation `turns` about `images` (`ModelImage`s and
    `ModelVideo`s, as many as the turns' `with_image` count, in order), ending where the
    assistant's answer starts, checked. A OneVision model's prompt with several images shows
    each as one tile and a newline (`load.media_in_prompt`; a lone image: anyres_max).

    max_new_tokens: the answer's length asked; `clamp`: lowered to what the context leaves
    (else a prompt and answer that do not fit are refused). system: a system prompt in
    place of the template's own. sampling: the other knobs of `LoadedModel.sampling`
    (temperature, top_k, top_p, seed), made a `SamplingConfig` with the new tokens that fit
    and the template's stop strings, then `stop`'s; None: no config (a caller that samples
    many prompts alike has its own).

    Raises `TurnError` for a turn whose text is not valid Unicode or writes `<image>` where
    no image goes; `InputError` when the prompt has not exactly its images' tokens, a NeXT
    conversation writes `<image>` a different number of times than it has images, its text
    cannot be tokenized or the system prompt cannot be used; `PromptTooLongError` when the
    prompt leaves no room for an answer (or, without `clamp`, for `max_new_tokens`);
    `ValueError` when the roles are out of order.
    """
    from llava_jax.inference.load import media_in_prompt  # load imports jax: not at import

    images = media_in_prompt(model.geometry, images)
    ids = model.prompt_ids(render_turns(model, turns), images, system=system)
    model.check_image_tokens(ids, images)  # the engine needs exactly those
    if clamp:
        max_new_tokens = model.check_prompt(ids, max_new_tokens, clamp=True)
    else:
        model.check_prompt(ids, max_new_tokens)
    config = None
    if sampling is not None:
        config = model.sampling(max_new_tokens=max_new_tokens, **sampling)
        if stop:
            stops = tuple(dict.fromkeys((*config.stop_strings, *stop)))
            config = dataclasses.replace(config, stop_strings=stops)
    return PreparedPrompt(ids, images, max_new_tokens, config)
