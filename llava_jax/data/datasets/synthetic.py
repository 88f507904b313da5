"""``synthetic``: coloured-shape images with captions and questions, made from a seed.

The embedded default dataset: no download, learnable by a tiny LLaVA on a CPU, and
truly image-dependent. Each image holds ``count`` copies of one shape in one colour;
a single shape sits at one side (left/right/top/bottom). Answers are single words
drawn uniformly, so guessing without the image scores about 1/3 at best.

Styles: ``caption`` (stage 1: one human turn + a caption), ``instruct`` (stage 2:
2-3 question/answer turns about colour, shape, count and position) and ``several`` (two
images a conversation, each shown behind its name, "Second image: <image>", with a question
about it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from llava_jax.data.conversation import GPT, HUMAN, TEMPLATES
from llava_jax.data.datasets.record import Record, features

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
COUNT_WORDS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom")
QUESTIONS = {
    "colour": ("What color are the objects?", "Which color do you see?"),
    "shape": ("What shape are the objects?", "Which shape do you see?"),
    "count": ("How many objects are there?", "How many shapes do you see?"),
    "position": ("Where is the object?", "On which side is the object?"),
}
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the picture?")
IMAGE_NAMES = ("First image:", "Second image:")  # `several`: which image a question asks about
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str | None  # only for a single shape


def sample_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 4))
    position = str(rng.choice(POSITIONS)) if count == 1 else None
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), count, position)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    else:  # cross
        w = r / 2.5
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)


@dataclasses.dataclass(frozen=True)
class SceneLayout:
    """What `render_scene` draws: the colours, the shapes' radius and, for each shape, its
    cell of the 3x3 grid (column, row) and its centre (x, y) in pixels."""

    background: tuple[int, ...]
    rgb: tuple[int, ...]
    radius: float
    shapes: tuple[tuple[tuple[int, int], tuple[float, float]], ...]


def scene_layout(scene: Scene, size: int, rng: np.random.Generator) -> SceneLayout:
    """The random draws of `render_scene(scene, size, rng)`, in its order (the example
    LLaVA-Bench takes its object boxes from them)."""
    background = tuple(int(v) for v in rng.integers(0, 60, size=3))
    rgb = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[scene.colour])
    cell = size / 3
    radius = cell * float(rng.uniform(0.3, 0.42))
    if scene.position is not None:
        col, row = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}[
            scene.position
        ]
        cells = [(col, row)]
    else:
        grid = [(c, r) for c in range(3) for r in range(3)]
        chosen = rng.choice(len(grid), size=scene.count, replace=False)
        cells = [grid[i] for i in chosen]
    shapes = []
    for col, row in cells:
        jitter = rng.uniform(-0.08, 0.08, size=2) * cell
        centre = ((col + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1])
        shapes.append(((col, row), (float(centre[0]), float(centre[1]))))
    return SceneLayout(background, rgb, radius, tuple(shapes))


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draws ``scene`` on a dark, slightly varying background (RGB, ``size x size``)."""
    layout = scene_layout(scene, size, rng)
    image = Image.new("RGB", (size, size), layout.background)
    draw = ImageDraw.Draw(image)
    for _, (cx, cy) in layout.shapes:
        _draw_shape(draw, scene.shape, cx, cy, layout.radius, layout.rgb)
    return image


def answer(scene: Scene, kind: str) -> str:
    return {
        "colour": scene.colour,
        "shape": scene.shape,
        "count": COUNT_WORDS[scene.count - 1],
        "position": scene.position,
    }[kind]


def caption(scene: Scene) -> str:
    noun = scene.shape if scene.count == 1 else scene.shape + "s"
    text = f"{COUNT_WORDS[scene.count - 1]} {scene.colour} {noun}"
    return text + (f" on the {scene.position}" if scene.position else "")


def conversation(scene: Scene, style: str, rng: np.random.Generator) -> list[dict]:
    """LLaVA-format turns about ``scene``; the first human turn holds ``<image>``."""
    if style == "caption":
        prompt = str(rng.choice(CAPTION_PROMPTS))
        return [
            {"from": HUMAN, "value": f"<image>\n{prompt}"},
            {"from": GPT, "value": caption(scene)},
        ]
    kinds = ["colour", "shape", "count"] + (["position"] if scene.position else [])
    chosen = rng.permutation(kinds)[: int(rng.integers(2, 4))]
    turns = []
    for index, kind in enumerate(chosen):
        question = str(rng.choice(QUESTIONS[str(kind)]))
        turns.append({"from": HUMAN, "value": ("<image>\n" if index == 0 else "") + question})
        turns.append({"from": GPT, "value": answer(scene, str(kind))})
    return turns


def several_conversation(scenes: list[Scene], rng: np.random.Generator) -> list[dict]:
    """A question about each image in turn: each human turn shows its image behind its name
    ("Second image: <image>"), then asks about it; every image of the conversation is in the
    prompt of the last question."""
    turns = []
    for name, scene in zip(IMAGE_NAMES, scenes, strict=True):
        kind = str(rng.choice(["colour", "shape", "count"] + (["position"] * bool(scene.position))))
        question = str(rng.choice(QUESTIONS[kind]))
        turns.append({"from": HUMAN, "value": f"{name} <image>\n{question}"})
        turns.append({"from": GPT, "value": answer(scene, kind)})
    return turns


def make_record(index: int, split: str, seed: int, image_size: int, style: str) -> Record:
    """Record ``index`` of ``split``: a pure function of its arguments."""
    split_key = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng([seed, split_key, index])
    scenes = [sample_scene(rng) for _ in range(len(IMAGE_NAMES) if style == "several" else 1)]
    images = []
    for scene in scenes:
        buffer = io.BytesIO()
        render_scene(scene, image_size, rng).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    if style == "several":
        turns = several_conversation(scenes, rng)
        paths = tuple(f"{split}/{index:06d}_{k}.png" for k in range(len(scenes)))
    else:
        turns, paths = conversation(scenes[0], style, rng), (f"{split}/{index:06d}.png",)
    return Record(
        id=f"synthetic-{split}-{index:06d}",
        image_bytes=tuple(images),
        image_paths=paths,
        conversations=tuple(turns),
    )


class SyntheticConfig(tfds.core.BuilderConfig):
    """Size and seed of the generated data; the name encodes them so that different
    settings never share a prepared directory."""

    def __init__(
        self,
        *,
        style: str = "instruct",
        image_size: int = 32,
        num_train: int = 4000,
        num_test: int = 400,
        seed: int = 0,
    ):
        if style not in ("caption", "instruct", "several"):
            raise ValueError(
                f"synthetic style must be 'caption', 'instruct' or 'several', not {style!r}"
            )
        name = f"{style}_{image_size}px_{num_train}_{num_test}_seed{seed}"
        super().__init__(name=name, version=tfds.core.Version("1.0.0"))
        self.style, self.image_size, self.seed = style, image_size, seed
        self.num_train, self.num_test = num_train, num_test


class Synthetic(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with captions or Q&A; splits ``train`` and ``test``."""

    # Nothing is downloaded, so no checksums file; TFDS 4.9's lookup of one next to the
    # code needs `importlib_resources`, which it does not install on Python >= 3.9.
    code_path = None

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []  # always built from an explicit SyntheticConfig (any name)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=features(),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, count: int):
        config = self.builder_config
        for index in range(count):
            record = make_record(index, split, config.seed, config.image_size, config.style)
            yield record.id, record.to_example()


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="isolated"),
        ]
    )


def vocabulary() -> dict[str, int]:
    """The word-level vocabulary of the synthetic data: the special tokens, then every word
    of the questions, answers, captions and every template's fixed text, sorted."""
    pre_tokenizer = _pre_tokenizer()
    rng = np.random.default_rng(0)
    corpus = list(QUESTIONS.values()) + [CAPTION_PROMPTS]
    corpus = [" ".join(texts) for texts in corpus]
    corpus += list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(COUNT_WORDS)
    corpus += list(POSITIONS) + ["on the"] + list(IMAGE_NAMES)
    for template in TEMPLATES.values():
        turns = conversation(sample_scene(rng), "instruct", rng)
        corpus.append(template.render(turns).text)
        corpus.append(template.render(turns[:1], generation_prompt=True).text)
    words = set()
    for text in corpus:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(words - set(vocab)):
        vocab[word] = len(vocab)
    return vocab


def tokenizer_name() -> str:
    """The folder name of the built tokenizer, keyed by its vocabulary: a tokenizer built
    from other templates (an older version of this code) is never taken for this one."""
    digest = hashlib.sha256(json.dumps(sorted(vocabulary().items())).encode()).hexdigest()
    return f"synthetic_tokenizer-{digest[:12]}"


def build_tokenizer(out_dir: str) -> str:
    """Builds the synthetic vocabulary's word-level tokenizer with ``tokenizers``, saves
    it to ``out_dir`` for ``AutoTokenizer.from_pretrained(out_dir)``; returns ``out_dir``.

    Spaces are dropped but newlines kept as tokens (``plain`` ends answers with
    ``"\\n"``); every template's fixed text is in the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"],
    )
    os.makedirs(out_dir, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir
