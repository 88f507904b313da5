"""A test tokenizer in Qwen2's shape (LLaVA-OneVision's decoder): byte-level BPE with Qwen2's
pre-tokenizer split pattern, the 256 byte symbols first in GPT-2's order (so "\\n", byte 10, is
id 198 as in Qwen's vocabulary, the id LLaVA-NeXT's preprocess_qwen writes literally), a few
hundred merges learned here, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as special
tokens; no BOS, eos `<|im_end|>`, pad `<|endoftext|>`, and Qwen2-Instruct's chat template, as
Qwen2-0.5B-Instruct's tokenizer_config.json has them."""

from __future__ import annotations

import json

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

# Qwen2's tokenizer.json pre_tokenizer: this Split (isolated), then ByteLevel without regex
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2-Instruct's tokenizer_config.json chat_template
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NEWLINE_ID = 198  # Qwen's "\n" ("Ċ")

CORPUS = (
    "You are a helpful assistant.",
    "system\nuser\nassistant\n",
    "What is shown?\nAnswer briefly.",
    "Where is it\nAnswer in one word",
    "A red circle.\n\nNear the top left.",
    "first line.\nsecond line.\n\nthird line\n\n",
    "How many circles? Exactly one, near the top. Compare them.",
    "There are 2 red circles, 13 blue squares and 7 green triangles.",
)


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's `bytes_to_unicode`, as a list: the symbol of each byte, in vocabulary order
    (printable bytes first, then the others shifted to 256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    order, symbols = list(printable), [chr(b) for b in printable]
    shifted = 0
    for byte in range(256):
        if byte not in order:
            order.append(byte)
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def qwen_shaped_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.NFC()
    trained.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(list(CORPUS) * 10, trainer)
    # the trainer numbers the bytes as it meets them: renumber them in GPT-2's order
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    vocab = {symbol: i for i, symbol in enumerate(gpt2_byte_symbols())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = QWEN2_CHAT_TEMPLATE
    assert wrapped("\n", add_special_tokens=False)["input_ids"] == [NEWLINE_ID]
    return wrapped
