"""The `llava_jax_shapes` task's document functions (lmms-eval imports this file by path)."""

import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    with Image.open(os.path.join(HERE, doc["image"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
