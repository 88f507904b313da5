"""Resuming a workdir: the run must be the one its checkpoints were saved by.

Checked at start-up, before anything in the workdir is written: the model's architecture
(not its numerics: dtype, remat, attention may change between runs), the conversation
format's version (a new one changes the training data), the tokenizer (a
fingerprint of its vocabulary and special tokens), and the train state's tree and shapes
(which also catch a changed optimizer or `train_pattern`). A mismatch is refused with the
fields that differ; nothing is restored, overwritten or deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from llava_jax import checkpoint as ckpt
from llava_jax.data.config import DataConfig
from llava_jax.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    tokenizer_difference,
    tokenizer_fingerprint,
)
from llava_jax.models.config import ModelConfig

TOKENIZER_DIR = "tokenizer"


class ResumeRefused(ValueError):
    """This run's settings do not match the checkpoints already in its workdir."""


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def model_differences(saved: dict, now: dict) -> list[str]:
    """`config.model` fields that change the architecture, as 'field: saved -> now'."""
    numerics = {f"config.model.{name}" for name in ModelConfig.NUMERICS}
    old, new = _flat(saved, "config.model"), _flat(now, "config.model")
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in numerics:
            continue
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            lines.append(f"{key}: {a} in the workdir, {b} now")
    return lines


def check_resumable(
    workdir: str,
    run_config: dict,
    tokenizer: LoadedTokenizer,
    abstract_state: Any,
    accept_new_tokenizer: bool = False,
) -> None:
    """Raise `ResumeRefused` if `workdir` holds checkpoints this run cannot continue."""
    try:
        step, saved = ckpt.read_run_config(workdir)
    except FileNotFoundError:
        return  # nothing to continue (or nothing readable: restore sets those aside)
    where = os.path.join(os.path.abspath(workdir), ckpt.CHECKPOINT_DIR, str(step))
    advice = "use another --workdir, or set them back to continue this one"
    differences = model_differences(saved.get("model", {}), run_config["model"])
    if differences:
        raise ResumeRefused(
            f"workdir {workdir} holds checkpoints of another model ({where}); these fields "
            f"differ: {'; '.join(differences)}. {advice}"
        )
    saved_version = DataConfig.saved(saved.get("data", {}), "the saved data config")
    version = run_config["data"]["template_version"]
    if saved_version.template_version != version:
        raise ResumeRefused(
            f"workdir {workdir} was trained with conversation template version "
            f"{saved_version.template_version} and this run writes version {version} "
            f"(data/conversation.py TEMPLATE_VERSION: LLaVA's own system prompt, tokens and "
            "targets), which changes the training data mid-run. Start a new run in another "
            f"--workdir (config.init.mode=checkpoint with config.init.checkpoint_path={workdir} "
            "starts from its weights)"
        )
    saved_tokenizer = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.isdir(saved_tokenizer):
        old = load_tokenizer(saved_tokenizer).tokenizer
        if tokenizer_fingerprint(old) != tokenizer_fingerprint(tokenizer.tokenizer):
            difference = tokenizer_difference(old, tokenizer.tokenizer)
            if not accept_new_tokenizer:
                raise ResumeRefused(
                    f"workdir {workdir} was trained with another tokenizer ({saved_tokenizer}: "
                    f"{difference}); its checkpoints' embeddings belong to that one. Use another "
                    "--workdir, or --config.init.accept_new_tokenizer=True to continue anyway"
                )
            logging.warning(
                "Continuing %s with another tokenizer (%s), as config.init.accept_new_tokenizer "
                "says",
                workdir,
                difference,
            )
    mismatches = ckpt.saved_state_mismatches(workdir, step, abstract_state)
    if mismatches:
        more = f" and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
        raise ResumeRefused(
            f"workdir {workdir}: the train state saved in {where} does not fit this run "
            f"(changed optimizer, train_pattern or scan_layers?): {'; '.join(mismatches[:5])}"
            f"{more}. {advice}"
        )
