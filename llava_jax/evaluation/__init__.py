"""Benchmark evaluation: scoring model answers the way LLaVA's ``eval/`` scripts do.

``scorers`` holds the pure scoring functions and the command line
(``python -m llava_jax.evaluation.scorers {vqa,mc,pope} ...``); ``vqa_normalize`` holds the
official VQA answer normalisation. Nothing here imports JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from llava_jax.evaluation.vqa_normalize import normalize_vqa_answer

_SCORER_NAMES = (
    "ScorerInputError",
    "extract_choice",
    "mc_accuracy",
    "pope_metrics",
    "pope_yes_no",
    "score_mc_file",
    "score_pope_file",
    "score_vqa_file",
    "vqa_accuracy",
    "vqa_accuracy_simple",
)

__all__ = ["normalize_vqa_answer", *_SCORER_NAMES]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m llava_jax.evaluation.scorers` does not find the module already
    # imported by its package (runpy warns about that).
    if name in _SCORER_NAMES:
        return getattr(importlib.import_module("llava_jax.evaluation.scorers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
