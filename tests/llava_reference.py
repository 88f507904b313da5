"""The LLaVA authors' own code (the `llava-torch` package, installed with `--no-deps` by the
README's test command), run beside ours: templates (`llava/conversation.py`),
`tokenizer_image_token` (`llava/mm_utils.py`) and the training targets (`preprocess_v1`,
`preprocess_llama_2`, `preprocess_plain`, `preprocess_multimodal` in
`llava/train/train.py`).

`llava/__init__.py` and `train.py` import LLaVA's whole model zoo and trainer (for the
transformers and torch of 2024), which these functions do not need: the package is
registered without running its `__init__`, and the preprocessing functions are taken from
`train.py`'s source as they are written and run with the names they use.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
import typing
from pathlib import Path

import tokenizers
import torch
import transformers
from packaging import version

TRAIN_FUNCTIONS = (
    "preprocess_multimodal",
    "preprocess_plain",
    "preprocess_v1",
    "preprocess_llama_2",
)


def package_root() -> Path:
    """The installed `llava` package's folder (once `load` registered the package without
    its `__init__`, it has no spec to find: its path is read from the module)."""
    registered = sys.modules.get("llava")
    if registered is not None and getattr(registered, "__path__", None):
        return Path(next(iter(registered.__path__)))
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the LLaVA authors' package is missing: pip install --no-deps llava-torch==1.2.2.post1"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load() -> types.SimpleNamespace:
    """LLaVA's `conversation` module, `tokenizer_image_token`, constants and the
    preprocessing functions of its trainer."""
    root = package_root()
    if "llava" not in sys.modules:
        package = types.ModuleType("llava")
        package.__path__ = [str(root)]
        sys.modules["llava"] = package
    conversation = importlib.import_module("llava.conversation")
    constants = importlib.import_module("llava.constants")
    mm_utils = importlib.import_module("llava.mm_utils")

    source = (root / "train" / "train.py").read_text()
    tree = ast.parse(source)
    wanted = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in TRAIN_FUNCTIONS
    ]
    assert {node.name for node in wanted} == set(TRAIN_FUNCTIONS), "train.py has changed"
    namespace = {
        "torch": torch,
        "transformers": transformers,
        "copy": __import__("copy"),
        "conversation_lib": conversation,
        "tokenizer_image_token": mm_utils.tokenizer_image_token,
        "IS_TOKENIZER_GREATER_THAN_0_14": version.parse(tokenizers.__version__)
        >= version.parse("0.14"),
        "DataArguments": object,
        **{name: getattr(typing, name) for name in ("Dict", "Sequence", "List", "Optional")},
        **{name: getattr(constants, name) for name in dir(constants) if name.isupper()},
    }
    module = ast.Module(body=wanted, type_ignores=[])
    exec(compile(module, str(root / "train" / "train.py"), "exec"), namespace)  # noqa: S102
    return types.SimpleNamespace(
        conversation=conversation,
        constants=constants,
        tokenizer_image_token=mm_utils.tokenizer_image_token,
        **{name: namespace[name] for name in TRAIN_FUNCTIONS},
    )


def training_row(
    llava: types.SimpleNamespace, turns: list[dict], tokenizer, template: str, has_image: bool
) -> tuple[list[int], list[int]]:
    """LLaVA's `(input_ids, labels)` of one conversation, as its `LazySupervisedDataset`
    makes them with `--version template` (labels -100 where not a target; each image one
    `IMAGE_TOKEN_INDEX`)."""
    import copy

    llava.conversation.default_conversation = llava.conversation.conv_templates[template]
    sources = [copy.deepcopy(turns)]
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    if has_image:
        sources = llava.preprocess_multimodal(sources, data_args)
    if template == "plain":
        out = llava.preprocess_plain(sources, tokenizer)
    elif template == "llava_llama_2":
        out = llava.preprocess_llama_2(sources, tokenizer, has_image=has_image)
    else:
        out = llava.preprocess_v1(sources, tokenizer, has_image=has_image)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


def generation_prompt(
    llava: types.SimpleNamespace, turns: list[dict], tokenizer, template: str
) -> list[int]:
    """LLaVA's inference prompt (`llava/eval/run_llava.py`, `model_vqa.py`): the turns so
    far in the template, the assistant's turn open, through `tokenizer_image_token`."""
    conv = llava.conversation.conv_templates[template].copy()
    for turn in turns:
        role = conv.roles[0] if turn["from"] == "human" else conv.roles[1]
        conv.append_message(role, turn["value"])
    conv.append_message(conv.roles[1], None)
    return llava.tokenizer_image_token(conv.get_prompt(), tokenizer)
