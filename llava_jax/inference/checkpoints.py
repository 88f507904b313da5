"""Finding and reading a model directory of each kind -> model config, parameters,
tokenizer and data settings (`load_checkpoint`).

`detect_kind(path)` recognises three kinds of directory:

- a training workdir (`checkpoints/<step>/{state,data,config}`, `tokenizer/`): the newest
  checkpoint's parameters (or `step=`), the model config, template and image settings of
  its run config, and the tokenizer the run saved. `workdir/checkpoints/<step>` also works.
- a Hugging Face LLaVA directory (`config.json` + safetensors, as `save_pretrained` writes
  it) with its tokenizer: template `vicuna_v1` (`mistral_instruct` for a Mistral decoder,
  as llava-v1.6-mistral; `qwen_1_5` for a Qwen2 one, as LLaVA-OneVision), images padded
  to a square (LLaVA-1.5), mean/std from `preprocessor_config.json` when there is one
  (CLIP's otherwise); a SigLIP tower's images resized to the square (no pad or crop),
  SigLIP's mean/std by default.
- a params checkpoint (`model_config.json` + `params/`, from `python -m llava_jax.convert`):
  needs a tokenizer (`tokenizer=`, or a `tokenizer/` folder inside it); template and
  image settings as for Hugging Face.

Problems the user can fix (a path, a missing checkpoint or tokenizer, a tokenizer that does
not belong to the model) raise `InputError` with a message that names the thing (no
tokenizer: an `ArgumentError` about `tokenizer`, which a program says as its flag).
`inference/load.py` turns what is read into a `LoadedModel`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

from llava_jax import checkpoint as ckpt
from llava_jax.data.config import DataConfig
from llava_jax.data.conversation import IMAGE_PLACEHOLDER
from llava_jax.data.image import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
from llava_jax.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    tokenizer_difference,
    tokenizer_fingerprint,
)
from llava_jax.errors import ArgumentError, InputError, Named
from llava_jax.models.config import ModelConfig
from llava_jax.sharding import Rules, sharded_params

HF_DEFAULT_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's conversation format
HF_MISTRAL_TEMPLATE = "mistral_instruct"  # llava-v1.6-mistral-7b's
HF_QWEN2_TEMPLATE = "qwen_1_5"  # LLaVA-OneVision's (Qwen2 decoders)
HF_CONFIG_FILE = "config.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_DIR = "tokenizer"  # inside a training workdir (or a params checkpoint)


# --- recognising a directory -------------------------------------------------------------------


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None


def detect_kind(path: str) -> tuple[str, str, int | None]:
    """(kind, directory, step) for `path`; `workdir/checkpoints/<step>` names a step."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise InputError(f"checkpoint path is not a directory: {path}")
    parent = os.path.dirname(os.path.normpath(path))
    name = os.path.basename(os.path.normpath(path))
    if name.isdigit() and os.path.basename(parent) == ckpt.CHECKPOINT_DIR:
        return "workdir", os.path.dirname(parent), int(name)
    if os.path.isdir(os.path.join(path, ckpt.CHECKPOINT_DIR)):
        return "workdir", path, None
    if os.path.isfile(os.path.join(path, ckpt.MODEL_CONFIG_FILE)):
        return "params", path, None
    config_path = os.path.join(path, HF_CONFIG_FILE)
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        if isinstance(config, dict) and ("vision_config" in config or "model_type" in config):
            return "hf", path, None
        if isinstance(config, dict) and "model" in config and "data" in config:
            return "workdir", path, None  # a run config, but nothing under checkpoints/
    raise InputError(
        f"{path} is not a recognised model directory: expected a training workdir "
        f"({ckpt.CHECKPOINT_DIR}/<step>/), a Hugging Face LLaVA directory ({HF_CONFIG_FILE} + "
        f"*.safetensors) or a params checkpoint ({ckpt.MODEL_CONFIG_FILE} + {ckpt.PARAMS_DIR}/)"
    )


def _find_tokenizer(
    path: str, tokenizer: str | None, default: str | None, hint: Callable[[Named], str]
) -> str:
    """The tokenizer directory: `tokenizer`, else `default`. Raises `ArgumentError` about
    `tokenizer` when there is none, ending with `hint(arg)` (what to give, naming it)."""
    candidate = tokenizer or default
    if candidate is None or not os.path.isdir(candidate):
        where = f" ({candidate} is not a directory)" if candidate else ""
        raise ArgumentError("tokenizer", lambda arg: f"no tokenizer for {path}{where}: {hint(arg)}")
    if tokenizer and default and os.path.isdir(default):
        _warn_if_another_tokenizer(tokenizer, default)
    return candidate


def _warn_if_another_tokenizer(given: str, saved: str) -> None:
    """`--tokenizer` other than the one the model was trained with: the same ids must mean
    the same words, or the answers are garbage (said, not refused: the user chose it)."""
    try:
        given_tok, saved_tok = load_tokenizer(given).tokenizer, load_tokenizer(saved).tokenizer
    except (OSError, ValueError):
        return  # the load that follows names the problem
    if tokenizer_fingerprint(given_tok) != tokenizer_fingerprint(saved_tok):
        logging.warning(
            "--tokenizer %s is not the tokenizer this model was trained with (%s): %s",
            given,
            saved,
            tokenizer_difference(saved_tok, given_tok),
        )


def _load_tokenizer(path: str) -> LoadedTokenizer:
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the tokenizer from {path}: {err}") from None


def _check_tokenizer(config: ModelConfig, tokenizer: LoadedTokenizer, where: str) -> None:
    """The tokenizer's `<image>` must be the model's image token and fit its vocabulary."""
    if tokenizer.image_token_id != config.image_token_id:
        raise InputError(
            f"the tokenizer of {where} maps {IMAGE_PLACEHOLDER} to id "
            f"{tokenizer.image_token_id}, but the model's image token id is "
            f"{config.image_token_id}: they do not belong together"
        )
    # The image placeholder is replaced by features and a pad the loader added is only ever
    # masked out, so neither needs an embedding row; every other token does.
    skipped = {IMAGE_PLACEHOLDER, *tokenizer.added_tokens}
    ids = [i for t, i in tokenizer.tokenizer.get_vocab().items() if t not in skipped]
    real_vocab = max(ids, default=-1) + 1
    if real_vocab > config.text.vocab_size:
        raise InputError(
            f"the tokenizer of {where} has {real_vocab} tokens, more than the model's "
            f"vocabulary of {config.text.vocab_size}"
        )


def _hf_data(
    path: str, text_model_type: str = "llama", vision_model_type: str = "clip"
) -> DataConfig:
    """LLaVA-1.5's conversation format (LLaVA-NeXT-Mistral's for a Mistral decoder) and
    images padded to a square (a SigLIP tower: resized, SigLIP's mean/std,
    `_default_images`); mean/std from the processor config when present."""
    processor = os.path.join(path, HF_PREPROCESSOR_FILE)
    images = _default_images(vision_model_type)
    if os.path.isfile(processor):
        values = _read_json(processor)
        images["image_mean"] = tuple(values.get("image_mean", images["image_mean"]))
        images["image_std"] = tuple(values.get("image_std", images["image_std"]))
    return DataConfig(template=_default_template(text_model_type), **images)


def _default_images(vision_model_type: str) -> dict[str, Any]:
    """The image settings of a checkpoint that names none: LLaVA-1.5's (padded to a
    square, CLIP's mean/std), or, for a SigLIP tower, its image processor's (a bicubic
    resize to the square, no crop; mean = std = 0.5)."""
    if vision_model_type == "siglip":
        return dict(image_aspect="resize", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return dict(image_aspect="pad", image_mean=CLIP_MEAN, image_std=CLIP_STD)


def _default_template(text_model_type: str) -> str:
    """The template of a checkpoint that names none: LLaVA-1.5's, LLaVA-NeXT-Mistral's for a
    Mistral decoder, LLaVA-OneVision's for a Qwen2 one."""
    by_decoder = {"mistral": HF_MISTRAL_TEMPLATE, "qwen2": HF_QWEN2_TEMPLATE}
    return by_decoder.get(text_model_type, HF_DEFAULT_TEMPLATE)


# --- the loaders -------------------------------------------------------------------------------

KIND_NAMES = {
    "workdir": "training workdir",
    "hf": "Hugging Face LLaVA directory",
    "params": "params checkpoint",
}


def _load_workdir(
    workdir: str, step: int | None, tokenizer: str | None, mesh: Any, rules: Rules, dtype: Any
) -> tuple[ModelConfig, Any, LoadedTokenizer, DataConfig, int]:
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    saved = _saved_steps(directory)
    if step is not None and step not in saved:
        have = ", ".join(map(str, saved)) if saved else "none yet"
        raise InputError(
            f"{workdir}: no checkpoint for step {step} in {directory} (saved steps: {have})"
        )
    if not saved:
        raise InputError(
            f"{workdir}: no checkpoint in {directory} (has the training run saved one yet?)"
        )
    try:  # the run config saved with that step (the newest readable one without a step)
        step, run_config = ckpt.read_run_config(workdir, step)
    except (OSError, ValueError) as err:  # missing, unreadable or malformed: name the file
        if step is None:
            which = f"any checkpoint in {directory} (steps {', '.join(map(str, saved))})"
        else:
            which = os.path.join(directory, str(step), "config", "metadata")
        raise InputError(
            f"{workdir}: cannot read the run config of {which}: {type(err).__name__}: {err}"
        ) from None
    config = ModelConfig.from_section(run_config["model"], f"{workdir}: the run config's model")
    if dtype is not None:
        config = config.replace(dtype=jax.numpy.dtype(dtype).name)
    params = ckpt.restore_params(workdir, _restore_target(config, mesh, rules), step=step)
    tokenizer_dir = _find_tokenizer(
        workdir,
        tokenizer,
        os.path.join(workdir, TOKENIZER_DIR),
        lambda arg: f"the training run saves it in WORKDIR/tokenizer; give {arg}",
    )
    data = DataConfig.saved(run_config.get("data", {}), "the run's data config")
    return config, params, _load_tokenizer(tokenizer_dir), data, step


def _saved_steps(directory: str) -> list[int]:
    """The steps with a folder under `workdir/checkpoints` (complete or not), in order."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _restore_target(config: ModelConfig, mesh: Any, rules: Rules) -> Any:
    """Where to restore parameters: onto the mesh's shardings, or None (the first device)."""
    if mesh is None:
        return None
    from llava_jax.models.llava import abstract_params

    return sharded_params(abstract_params(config), mesh, rules)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model directory, read: the model config, its parameters (on the mesh's shardings,
    or host/first-device arrays), the tokenizer, the data settings inputs are prepared with,
    and the training step (workdirs only)."""

    config: ModelConfig
    params: Any
    tokenizer: LoadedTokenizer
    data: DataConfig
    step: int | None = None


def load_checkpoint(
    path: str,
    kind: str,
    directory: str,
    *,
    step: int | None,
    tokenizer: str | None,
    mesh: Any,
    rules: Rules,
    dtype: Any,
) -> Checkpoint:
    """Read the model `directory` of `kind` (what `detect_kind(path)` found), checking that
    its tokenizer belongs to the model. step, tokenizer, mesh, rules and dtype: as for
    `load_model`, already checked.

    Raises `InputError` naming `path`: no checkpoint, no tokenizer, a damaged checkpoint or
    config, a tokenizer that does not match the model.
    """
    run_step = None
    numerics = {} if dtype is None else {"dtype": jax.numpy.dtype(dtype).name}
    try:
        if kind == "workdir":
            config, params, loaded_tokenizer, data, run_step = _load_workdir(
                directory, step, tokenizer, mesh, rules, dtype
            )
        elif kind == "hf":
            from llava_jax.convert import load_hf

            config, params = load_hf(directory, **numerics)
            loaded_tokenizer = _load_tokenizer(
                _find_tokenizer(directory, tokenizer, directory, lambda arg: f"give {arg}")
            )
            data = _hf_data(directory, config.text.model_type, config.vision.model_type)
        else:
            tokenizer_dir = _find_tokenizer(
                directory,
                tokenizer,
                os.path.join(directory, TOKENIZER_DIR)
                if os.path.isdir(os.path.join(directory, TOKENIZER_DIR))
                else None,
                lambda arg: f"a params checkpoint holds no tokenizer; give {arg('DIR')}",
            )
            config_path = os.path.join(directory, ckpt.MODEL_CONFIG_FILE)
            with open(config_path) as f:
                config = ModelConfig.from_section(json.load(f), config_path)
            _, params = ckpt.load_params(directory, _restore_target(config, mesh, rules))
            if dtype is not None:
                config = config.replace(**numerics)
            loaded_tokenizer = _load_tokenizer(tokenizer_dir)
            data = DataConfig(
                template=_default_template(config.text.model_type),
                **_default_images(config.vision.model_type),
            )
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as err:
        # A damaged checkpoint or config: say which directory, keep the reason.
        raise InputError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from err
    _check_tokenizer(config, loaded_tokenizer, path)
    return Checkpoint(config, params, loaded_tokenizer, data, run_step)
