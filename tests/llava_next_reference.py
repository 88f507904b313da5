"""LLaVA-NeXT's own preprocessing for LLaVA-OneVision (`--version qwen_1_5`), written out
line for line from LLaVA-VL/LLaVA-NeXT (llava/train/train.py at commit 45f2d920a6c6:
`preprocess_multimodal`, `preprocess_qwen`; llava/conversation.py: `conv_qwen`,
`SeparatorStyle.CHATML` in `Conversation.get_prompt`). LLaVA-NeXT is not on PyPI and its
package imports its whole model zoo, so the functions are copied here rather than imported.

Changed only where transformers 5 or this file's use needs it, each marked `# here:`:
`additional_special_tokens_ids` (gone in transformers 5) is read from `extra_special_tokens`,
`apply_chat_template` is asked for a list (`return_dict=False`, its transformers 4 default),
and plain lists come back instead of torch tensors.
"""

from __future__ import annotations

import copy
import re

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"

# conv_qwen
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."
QWEN_ROLES = ("<|im_start|>user", "<|im_start|>assistant")
QWEN_SEP = "<|im_end|>"


def conv_qwen_prompt(messages: list[tuple[str, str | None]], system: str = QWEN_SYSTEM) -> str:
    """`Conversation.get_prompt()` of `conv_qwen` (SeparatorStyle.CHATML) for string
    messages `[(role, message or None), ...]`; None opens the assistant's turn."""
    ret = "" if system == "" else system + QWEN_SEP + "\n"
    for role, message in messages:
        if message:
            ret += role + "\n" + message + QWEN_SEP + "\n"
        else:
            ret += role + "\n"
    return ret


def preprocess_multimodal(sources: list[list[dict]]) -> list[list[dict]]:
    """`preprocess_multimodal` with is_multimodal=True, mm_use_im_start_end=False and a
    version without "mmtag" (qwen_1_5's)."""
    for source in sources:
        for sentence in source:
            num_im = len(re.findall(DEFAULT_IMAGE_TOKEN, sentence["value"]))
            if (
                num_im == 1
                and DEFAULT_IMAGE_TOKEN in sentence["value"]
                and not sentence["value"].startswith(DEFAULT_IMAGE_TOKEN)
            ):
                sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
                sentence["value"] = sentence["value"].strip()
            replace_token = DEFAULT_IMAGE_TOKEN
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, replace_token)
            sentence["value"] = sentence["value"].replace("QA_GT_caption_based_noisy", "")
    return sources


def preprocess_qwen(
    sources,
    tokenizer,
    has_image: bool = False,
    max_len=2048,
    system_message: str = "You are a helpful assistant.",
) -> dict:
    roles = {"human": "user", "gpt": "assistant"}

    # Add image tokens to tokenizer as a special tokens
    # Use a deepcopy of tokenizer so that we don't modify on the tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    # When there is actually an image, we add the image tokens as a special token
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)

    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    # here: im_start, im_end = tokenizer.additional_special_tokens_ids
    im_start, im_end = tokenizer.convert_tokens_to_ids(tokenizer.extra_special_tokens)
    # unmask_tokens = ["<|im_start|>", "<|im_start|>", "\n"]
    unmask_tokens_idx = [198, im_start, im_end]

    # Reset Qwen chat templates so that it won't include system message every time we apply
    chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.chat_template = chat_template

    # Apply prompt templates
    input_ids, targets = [], []
    for source in sources:
        if roles[source[0]["from"]] != roles["human"]:
            source = source[1:]

        input_id, target = [], []

        # New version, use apply chat template
        # Build system message for each sentence
        input_id += tokenizer.apply_chat_template(
            [{"role": "system", "content": system_message}],
            return_dict=False,  # here
        )
        target += [IGNORE_INDEX] * len(input_id)

        for conv in source:
            # Make sure llava data can load
            try:
                role = conv["role"]
                content = conv["content"]
            except KeyError:  # here: a bare except in LLaVA-NeXT
                role = conv["from"]
                content = conv["value"]

            role = roles.get(role, role)

            conv = [{"role": role, "content": content}]
            encode_id = tokenizer.apply_chat_template(conv, return_dict=False)  # here
            input_id += encode_id
            if role in ["user", "system"]:
                target += [IGNORE_INDEX] * len(encode_id)
            else:
                target += encode_id

        assert len(input_id) == len(target), f"{len(input_id)} != {len(target)}"
        for idx, encode_id in enumerate(input_id):
            if encode_id in unmask_tokens_idx:
                target[idx] = encode_id
            if encode_id == image_token_index:
                input_id[idx] = IMAGE_TOKEN_INDEX
        input_ids.append(input_id)
        targets.append(target)
    return dict(input_ids=input_ids, labels=targets)  # here: lists, not tensors


def training_row(turns: list[dict], tokenizer, system_message: str | None = None):
    """`(input_ids, labels)` of one conversation as LLaVA-NeXT's LazySupervisedDataset makes
    them for `--version qwen_1_5` (has_image: the sample has an image)."""
    has_image = any(DEFAULT_IMAGE_TOKEN in turn["value"] for turn in turns)
    sources = [copy.deepcopy(turns)]
    if has_image:  # as _get_item calls it: for a sample with an image (or a video)
        sources = preprocess_multimodal(sources)
    kwargs = {} if system_message is None else {"system_message": system_message}
    out = preprocess_qwen(sources, tokenizer, has_image=has_image, **kwargs)
    return out["input_ids"][0], out["labels"][0]
