"""LLaVA-Bench on disk, and what a GPT-4 judge is asked about it (LLaVA's
`llava/eval/eval_gpt_review_bench.py` and `eval_gpt_review_visual.py`).

A benchmark folder, in LLaVA's layout::

    questions.jsonl      {"question_id": 0, "image": "001.jpg", "text": "…", "category": "conv"}
    context.jsonl        {"image": "001.jpg", "caption": "…"}     (LLaVA-Bench In-the-Wild;
                         "caption" may be a list of sentences), or COCO's form (LLaVA-Bench
                         COCO): {"image": "…", "captions": ["…", …],
                         "instances": [{"category": "dog", "bbox": [x1, y1, x2, y2]}, …]}
    answers_gpt4.jsonl   the reference answers: {"question_id": 0, "text": "…", "answer_id": "…"}
    images/              the questions' images (for answering; the judge reads only text)

and a rule file in the shape of LLaVA's `rule.json`: `{"llava_bench_conv": {"role":
"Assistant", "prompt": "…"}, …}`, one entry per question category (`llava_bench_` + the
question's `category`).

`load_benchmark` reads and checks it all before anything is judged; every problem is an
`InputError` naming the file and line, the field, or the key: a line that is not a JSON
object, a missing or mistyped field, a duplicate question id or context image, a question
whose image has no context, whose category the rule lacks, or that has no reference answer,
a reference answer for no question. `read_model_answers` does the same for the model's
answers (LLaVA's answer format, as `python -m llava_jax.evaluate` writes it; an entry with an
`error` is a question the model failed, judged as failed).

`review_content` builds the judge's user message exactly as LLaVA does, and `parse_score`
reads the judge's reply exactly as LLaVA's `parse_score` does, but says "unparsable" (None)
where LLaVA records [-1, -1]. Nothing here imports JAX or talks to a network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_jax.errors import InputError
from llava_jax.evaluation.jsonl import read_records
from llava_jax.json_input import JSONInputError, loads

QUESTIONS_FILE = "questions.jsonl"
CONTEXT_FILE = "context.jsonl"
REFERENCES_FILE = "answers_gpt4.jsonl"
IMAGES_DIR = "images"
CATEGORY_PREFIX = "llava_bench_"  # rule keys and review categories: llava_bench_<category>
CATEGORIES = ("conv", "detail", "complex")  # LLaVA-Bench's; others are read too
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."


class BenchmarkError(InputError):
    """A benchmark file, or the rule file, cannot be used; the message names the file and
    the line, field or key."""


class AnswersFileError(InputError):
    """The model's answers file cannot be used; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One entry of the rule file: the judge's name for the answerers and its instructions."""

    role: str
    prompt: str


@dataclasses.dataclass(frozen=True)
class Context:
    """What the judge knows of an image: the `[Context]` section's text, as LLaVA writes it
    (COCO's form: the captions, a blank line, then one `category: bbox` line per object)."""

    image: str
    text: str
    line: int


@dataclasses.dataclass(frozen=True)
class BenchQuestion:
    """One line of questions.jsonl; `index` is its 1-based place (the review's `id`)."""

    question_id: Any
    image: str
    text: str
    category: str
    line: int
    index: int

    @property
    def key(self) -> str:
        return str(self.question_id)  # 1 and "1" name the same question, as everywhere here

    @property
    def review_category(self) -> str:
        return CATEGORY_PREFIX + self.category


@dataclasses.dataclass(frozen=True)
class Answer:
    """A reference answer or one of the model's; `error`: the model failed this question."""

    question_id: Any
    text: str
    answer_id: Any
    line: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A loaded, checked benchmark; `contexts` by image, `references` by question key."""

    directory: str
    questions: list[BenchQuestion]
    contexts: dict[str, Context]
    references: dict[str, Answer]
    rules: dict[str, Rule]
    rule_path: str

    @property
    def files(self) -> dict[str, str]:
        """The files the judge's reviews depend on, by the name the user knows them by."""
        return {
            QUESTIONS_FILE: os.path.join(self.directory, QUESTIONS_FILE),
            CONTEXT_FILE: os.path.join(self.directory, CONTEXT_FILE),
            REFERENCES_FILE: os.path.join(self.directory, REFERENCES_FILE),
            "--rule": self.rule_path,
        }

    def rule_for(self, question: BenchQuestion) -> Rule:
        return self.rules[question.review_category]

    def context_for(self, question: BenchQuestion) -> Context:
        return self.contexts[question.image]


# --- reading ---------------------------------------------------------------------------------


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "not found"
        raise BenchmarkError(f"{what} {path} {state}")


def read_rules(path: str) -> dict[str, Rule]:
    """The rule file's entries whose value is an object; `check_rules` checks the ones a
    benchmark uses. Raises `BenchmarkError` naming the file for malformed JSON or a file
    that is not a JSON object."""
    _require_file(path, "rule file")
    try:
        obj = loads(Path(path).read_bytes())
    except OSError as err:
        raise BenchmarkError(f"rule file {path}: cannot read: {err.strerror or err}") from None
    except JSONInputError as err:
        raise BenchmarkError(f"rule file {path}: {err}") from None
    if not isinstance(obj, dict):
        raise BenchmarkError(
            f"rule file {path}: expected a JSON object of rules "
            '({"llava_bench_conv": {"role": …, "prompt": …}, …})'
        )
    rules = {}
    for key, value in obj.items():
        if not key.startswith(CATEGORY_PREFIX):
            continue  # LLaVA's rule.json holds other benchmarks' rules too
        if not isinstance(value, dict):
            raise BenchmarkError(f"rule file {path}: {key!r} must be an object with role, prompt")
        for field in ("role", "prompt"):
            if not isinstance(value.get(field), str) or not value[field].strip():
                raise BenchmarkError(
                    f"rule file {path}: {key!r} needs a non-empty string {field!r}"
                )
        rules[key] = Rule(role=value["role"], prompt=value["prompt"])
    return rules


def _context_text(where: str, obj: dict[str, Any]) -> str:
    """The `[Context]` section's body: LLaVA's cap_str, and COCO's boxes after a blank line."""
    if "caption" in obj and "captions" in obj:
        raise BenchmarkError(
            f"{where}: has both 'caption' (LLaVA-Bench In-the-Wild) and 'captions' (COCO); keep one"
        )
    if "caption" in obj:
        caption = obj["caption"]
        if isinstance(caption, str):
            return caption
        if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
            return "\n".join(caption)
        raise BenchmarkError(f"{where}: 'caption' must be a string or a list of strings")
    if "captions" not in obj:
        raise BenchmarkError(
            f"{where}: no 'caption' (a string or list) nor 'captions' with 'instances' (COCO)"
        )
    captions = obj["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise BenchmarkError(f"{where}: 'captions' must be a list of strings")
    instances = obj.get("instances")
    if not isinstance(instances, list):
        raise BenchmarkError(f"{where}: COCO's form needs 'instances', a list of objects")
    boxes = []
    for i, instance in enumerate(instances):
        name = f"{where}: 'instances'[{i}]"
        if not isinstance(instance, dict) or not isinstance(instance.get("category"), str):
            raise BenchmarkError(f"{name} needs a string 'category'")
        bbox = instance.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in bbox)
        ):
            raise BenchmarkError(f"{name}: 'bbox' must be four numbers [x1, y1, x2, y2]")
        # As LLaVA's eval_gpt_review_visual.py writes it: Python's str of the list.
        boxes.append(f"{instance['category']}: {bbox}")
    return "\n".join(captions) + "\n\n" + "\n".join(boxes)


def read_contexts(path: str) -> dict[str, Context]:
    """context.jsonl by image; either form of a line (see the module docstring)."""
    _require_file(path, "context file")
    contexts: dict[str, Context] = {}
    for number, obj in read_records(path, BenchmarkError, require=None):
        where = f"{path}:{number}"
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise BenchmarkError(f"{where}: 'image' must be the image's file name")
        if image in contexts:
            first = contexts[image].line
            raise BenchmarkError(f"{where}: a second context for image {image!r} (first: {first})")
        contexts[image] = Context(image=image, text=_context_text(where, obj), line=number)
    return contexts


def _question_id_key(obj: dict[str, Any], where: str, error: type[InputError]) -> str:
    question_id = obj["question_id"]
    if not isinstance(question_id, (int, str)) or isinstance(question_id, bool):
        raise error(f"{where}: 'question_id' must be a number or a string")
    return str(question_id)


def read_bench_questions(path: str) -> list[BenchQuestion]:
    """questions.jsonl, each with a string `text`, `image` and `category`; ids unique."""
    _require_file(path, "questions file")
    questions: list[BenchQuestion] = []
    seen: dict[str, int] = {}
    for number, obj in read_records(path, BenchmarkError):
        where = f"{path}:{number}"
        key = _question_id_key(obj, where, BenchmarkError)
        for field in ("text", "image", "category"):
            if not isinstance(obj.get(field), str) or not obj[field]:
                raise BenchmarkError(f"{where}: {field!r} must be a non-empty string")
        if key in seen:
            raise BenchmarkError(
                f"{where}: duplicate question_id {obj['question_id']!r} (first on line {seen[key]})"
            )
        seen[key] = number
        questions.append(
            BenchQuestion(
                question_id=obj["question_id"],
                image=obj["image"],
                text=obj["text"],
                category=obj["category"],
                line=number,
                index=len(questions) + 1,
            )
        )
    if not questions:
        raise BenchmarkError(f"{path}: no questions")
    return questions


def _read_answers(path: str, error: type[InputError], *, model: bool) -> dict[str, Answer]:
    answers: dict[str, Answer] = {}
    for number, obj in read_records(path, error):
        where = f"{path}:{number}"
        key = _question_id_key(obj, where, error)
        if key in answers:
            first = answers[key].line
            raise error(
                f"{where}: a second answer to question_id {obj['question_id']!r} "
                f"(first on line {first})"
            )
        failure = obj.get("error") if model else None
        if failure is not None:
            answers[key] = Answer(
                obj["question_id"], "", obj.get("answer_id"), number, str(failure)
            )
            continue
        if not isinstance(obj.get("text"), str):
            raise error(f"{where}: 'text' must be a string")
        # LLaVA: ans.get('answer_id', ans['question_id'])
        answer_id = obj.get("answer_id", obj["question_id"])
        answers[key] = Answer(obj["question_id"], obj["text"], answer_id, number)
    return answers


def load_benchmark(directory: str, rule_path: str, *, check_images: bool = False) -> Benchmark:
    """Read and check a benchmark folder and its rule file (see the module docstring);
    `check_images`: every question's image must also be a file under `images/`."""
    if not os.path.isdir(directory):
        state = "is not a folder" if os.path.exists(directory) else "not found"
        raise BenchmarkError(f"benchmark folder {directory} {state}")
    questions_path = os.path.join(directory, QUESTIONS_FILE)
    context_path = os.path.join(directory, CONTEXT_FILE)
    references_path = os.path.join(directory, REFERENCES_FILE)
    questions = read_bench_questions(questions_path)
    contexts = read_contexts(context_path)
    _require_file(references_path, "reference answers")
    references = _read_answers(references_path, BenchmarkError, model=False)
    rules = read_rules(rule_path)
    keys = {q.key for q in questions}
    for question in questions:
        where = f"{questions_path}:{question.line}: question {question.question_id!r}"
        if question.image not in contexts:
            raise BenchmarkError(
                f"{where}: image {question.image!r} has no context in {context_path}"
            )
        if question.review_category not in rules:
            raise BenchmarkError(
                f"{where}: category {question.category!r} has no rule "
                f"{question.review_category!r} in the rule file {rule_path}"
            )
        if question.key not in references:
            raise BenchmarkError(f"{where}: no reference answer in {references_path}")
        if check_images:
            image = os.path.join(directory, IMAGES_DIR, question.image)
            if not os.path.isfile(image):
                raise BenchmarkError(f"{where}: image {image} not found")
    for key, reference in references.items():
        if key not in keys:
            raise BenchmarkError(
                f"{references_path}:{reference.line}: a reference answer to question_id "
                f"{reference.question_id!r}, which {questions_path} does not have"
            )
    return Benchmark(
        directory=directory,
        questions=questions,
        contexts=contexts,
        references=references,
        rules=rules,
        rule_path=rule_path,
    )


def read_model_answers(path: str, benchmark: Benchmark) -> dict[str, Answer]:
    """The model's answers by question key: one for every question of the benchmark and
    none for any other (raises `AnswersFileError` naming the file, the line or the missing
    questions). An entry with an `error` field keeps it in `Answer.error`."""
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "not found"
        raise AnswersFileError(f"answers file {path} {state}")
    answers = _read_answers(path, AnswersFileError, model=True)
    keys = {q.key for q in benchmark.questions}
    for key, answer in answers.items():
        if key not in keys:
            raise AnswersFileError(
                f"{path}:{answer.line}: an answer to question_id {answer.question_id!r}, which "
                f"the benchmark's {QUESTIONS_FILE} does not have (answers to another benchmark?)"
            )
    missing = [q for q in benchmark.questions if q.key not in answers]
    if missing:
        named = ", ".join(repr(q.question_id) for q in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise AnswersFileError(
            f"{path}: no answer to {len(missing)} of the benchmark's {len(benchmark.questions)} "
            f"questions (question_id {named}{more})"
        )
    return answers


# --- what the judge is asked, and what its reply means ----------------------------------------


def review_content(
    context: Context, question: BenchQuestion, first: str, second: str, rule: Rule
) -> str:
    """The judge's user message, character for character LLaVA's: `first` is Assistant 1's
    answer (LLaVA: the reference), `second` Assistant 2's (the model's)."""
    role = rule.role
    return (
        f"[Context]\n{context.text}\n\n"
        f"[Question]\n{question.text}\n\n"
        f"[{role} 1]\n{first}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{second}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule.prompt}\n\n"
    )


def judge_messages(content: str) -> list[dict[str, str]]:
    """The chat messages LLaVA sends: its system message, then `content`."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def parse_score(review: str) -> tuple[float, float] | None:
    """LLaVA's `parse_score`: the first line, commas made spaces, split on single spaces,
    exactly two numbers (so "8 7" and "8,7" parse; "8, 7" and "8 7 " do not, as in LLaVA).
    None where LLaVA records [-1, -1]; also for "nan" or "inf", which LLaVA would average in."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return None
    try:
        scores = (float(parts[0]), float(parts[1]))
    except ValueError:
        return None
    if not all(math.isfinite(s) for s in scores):
        return None
    return scores


def describe_categories(questions: list[BenchQuestion]) -> dict[str, int]:
    """How many questions each category has, LLaVA-Bench's three first."""
    counts: dict[str, int] = {}
    for question in questions:
        counts[question.category] = counts.get(question.category, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: category_order(kv[0])))


def category_order(category: str) -> tuple[int, str]:
    """Sort key: conv, detail, complex, then any other category by name, `all` last."""
    bare = category.removeprefix(CATEGORY_PREFIX)
    if bare == "all":
        return (len(CATEGORIES) + 1, "")
    if bare in CATEGORIES:
        return (CATEGORIES.index(bare), "")
    return (len(CATEGORIES), bare)


def dumps_line(record: Mapping[str, Any]) -> str:
    """One JSON line as LLaVA writes its reviews (ASCII-escaped), newline-terminated."""
    return json.dumps(record) + "\n"
