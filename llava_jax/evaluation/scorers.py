"""Scorers for LLaVA-style benchmark answers: VQA accuracy, multiple-choice letters, POPE.

Each scorer is a pure function plus a file-level wrapper used by the command line::

    python -m llava_jax.evaluation.scorers {vqa,mc,pope} \\
        --answers answers.jsonl --annotations annotations.jsonl [--out metrics.json]

Answers file (LLaVA's ``answers.jsonl``), one JSON object per line::

    {"question_id": 1, "text": "two dogs"}
    {"question_id": 2, "error": "timeout"}        # failed question: scored as wrong

Annotation files, one JSON object per line, keyed by ``question_id``:

* ``vqa``:  ``{"question_id": 1, "answers": ["2", "two", ...]}`` (usually 10 annotators)
* ``mc``:   ``{"question_id": 1, "answer": "B", "options": ["cat", "dog"]}``; ``options`` is
  optional and may also be a mapping ``{"A": "cat", "B": "dog"}``
* ``pope``: ``{"question_id": 1, "label": "yes"}``; an optional ``category`` (e.g.
  ``"adversarial"``) adds a per-category breakdown

Question ids are compared as strings, so ``1`` and ``"1"`` name the same question.  Metrics
are fractions in [0, 1], computed over the questions in the answers file; every answer must
have an annotation, and annotations without an answer are only counted.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax.evaluation.jsonl import read_records
from llava_jax.evaluation.vqa_normalize import normalize_vqa_answer

__all__ = [
    "ScorerInputError",
    "extract_choice",
    "main",
    "mc_accuracy",
    "pope_metrics",
    "pope_yes_no",
    "score_mc_file",
    "score_pope_file",
    "score_vqa_file",
    "vqa_accuracy",
    "vqa_accuracy_simple",
]

# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------


def _count_matches(prediction: str, gt_answers: Sequence[str], normalize: bool) -> list[bool]:
    if not gt_answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    if normalize:
        prediction = normalize_vqa_answer(prediction)
        gt_answers = [normalize_vqa_answer(a) for a in gt_answers]
    return [a == prediction for a in gt_answers]


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], *, normalize: bool = True) -> float:
    """Official VQA accuracy: mean over the leave-one-annotator-out subsets of min(#match/3, 1).

    With the usual 10 annotators this averages over the 10 subsets of 9 answers.  Unlike the
    GitHub ``vqaEval.py`` (which normalises ground truth only when annotators disagree), both
    sides are always fully normalised, as the EvalAI server and LLaVA's TextVQA evaluator do;
    for clean annotations the two agree.  A single reference answer cannot be left out, so it
    is scored by exact match.
    """
    matches = _count_matches(prediction, gt_answers, normalize)
    if len(matches) == 1:
        return float(matches[0])
    accs = []
    for left_out in range(len(matches)):
        others = sum(m for i, m in enumerate(matches) if i != left_out)
        accs.append(min(1.0, others / 3))
    return sum(accs) / len(accs)


def vqa_accuracy_simple(
    prediction: str, gt_answers: Sequence[str], *, normalize: bool = True
) -> float:
    """The commonly quoted simplification min(#matching annotators / 3, 1)."""
    return min(1.0, sum(_count_matches(prediction, gt_answers, normalize)) / 3)


# ---------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA / MMBench)
# ---------------------------------------------------------------------------------------------

Options = Sequence[str] | Mapping[str, str]

# "A", "(B)", "c.", "[D]" — the whole answer is one letter.
_ONLY_LETTER = re.compile(r"[(\[{<]?\s*([A-Za-z])\s*[)\]}>]?\s*[.:,;!]?")
# "C. cat", "(C) cat", "C) cat", "C: cat" — an upper-case letter introducing the option text.
_LEADING_LETTER = re.compile(r"[(\[]?([A-Z])(?:[)\]][.:]?|[.:])(?:\s|$)")
# "The answer is C.", "Answer: D", "the correct option is (B)", "Option B".  Key words are
# case-insensitive, the letter is not, so "the answer is a cat" is not read as A.  "answer"
# phrases are tried before bare "option"/"choice" ones, so restating the options ("Option A
# is a cat, option B a dog. The answer is B.") does not make the answer ambiguous.
_PHRASE_TAIL = (
    r"\s*(?:(?i:is|would be|should be)\b\s*)?[:\-]?\s*"
    r"(?:(?i:option|choice)\s+)?[(\[]?([A-Z])(?![\w'])"
)
_PHRASES = (
    re.compile(r"(?i:\banswer\b)" + _PHRASE_TAIL),
    re.compile(r"(?i:\b(?:option|choice)\b)" + _PHRASE_TAIL),
)
# A standalone upper-case letter anywhere ("I think B").
_LETTER_TOKEN = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
# "A" and "I" are also English words; followed by a lower-case word they are not a choice.
_WORD_LIKE_LETTERS = frozenset("AI")
_FOLLOWED_BY_WORD = re.compile(r"\s+[a-z]")


def _options_dict(options: Options | None) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    if len(options) > 26:
        raise ValueError(f"at most 26 options are supported, got {len(options)}")
    return {string.ascii_uppercase[i]: str(o) for i, o in enumerate(options)}


def _norm_text(text: str) -> str:
    """Lower-case, collapse whitespace, trim surrounding punctuation: for option-text matching."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _unique(letters: Sequence[str]) -> str | None:
    distinct = set(letters)
    return distinct.pop() if len(distinct) == 1 else None


def extract_choice(
    text: str, options: Options | None = None, letters: str | None = None
) -> str | None:
    """Extract the chosen option letter from a free-form answer, or None if it cannot be told.

    Tried in order, the first rule that applies wins:

    1. the whole answer is a letter, maybe bracketed or punctuated: ``"B"``, ``"(B)"``, ``"b."``
    2. the answer starts with a letter and a separator: ``"C. cat"``, ``"(C) cat"``
       (LLaVA's ScienceQA rule ``text[0] in options and text[1:3] == ". "``, generalised)
    3. a phrase naming the letter: ``"The answer is C."``, ``"Answer: D"``, ``"option (B)"``
       (LLaVA's ScienceQA ``The answer is ([A-Z]).``, generalised); "answer" phrases
       before "option"/"choice" ones; different letters named by the same kind of phrase
       make the answer ambiguous -> None
    4. with ``options``: the answer is an option's text (case and surrounding punctuation
       ignored)
    5. exactly one valid standalone capital letter occurs (MMBench's ``can_infer_option``);
       option texts are masked first so "Vitamin C" does not read as C, and "A"/"I" followed
       by a lower-case word are taken as English words
    6. with ``options``: exactly one option's text occurs in the answer as whole words
       (MMBench's ``can_infer_text``); an option contained in another matched option (e.g.
       "red" in "dark red") gives way to the longer one

    Args:
        text: the model's answer.
        options: option texts, as a list (lettered A, B, ...) or a letter -> text mapping.
        letters: valid letters when ``options`` is not given (default A-Z).
    """
    opts = _options_dict(options)
    valid = set(opts) if opts else set(letters or string.ascii_uppercase)
    s = text.strip()
    if not s:
        return None

    m = _ONLY_LETTER.fullmatch(s)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    m = _LEADING_LETTER.match(s)
    if m and m.group(1) in valid:
        return m.group(1)
    for phrase in _PHRASES:
        named = [m.group(1) for m in phrase.finditer(s) if m.group(1) in valid]
        if named:
            return _unique(named)

    # Whole-word occurrences of each option text (for masking and for rule 6).
    found: dict[str, list[tuple[int, int]]] = {}
    norm_answer = _norm_text(s)
    for letter, opt in opts.items():
        norm_opt = _norm_text(opt)
        if not norm_opt:
            continue
        if norm_answer == norm_opt:
            return letter
        pattern = re.compile(r"(?<!\w)" + re.escape(norm_opt) + r"(?!\w)")
        spans = [m.span() for m in pattern.finditer(s.lower())]
        if spans:
            found[letter] = spans

    masked = list(s)
    for spans in found.values():
        for start, end in spans:
            masked[start:end] = " " * (end - start)
    masked_text = "".join(masked)
    tokens = []
    for m in _LETTER_TOKEN.finditer(masked_text):
        letter = m.group(1)
        if letter not in valid:
            continue
        if letter in _WORD_LIKE_LETTERS and _FOLLOWED_BY_WORD.match(masked_text, m.end()):
            continue
        tokens.append(letter)
    if tokens:
        return _unique(tokens)

    texts = {letter: _norm_text(opts[letter]) for letter in found}
    # Drop options whose text is part of another matched option's (longer) text.
    kept = [
        letter
        for letter, t in texts.items()
        if not any(t != u and t in u for other, u in texts.items() if other != letter)
    ]
    return kept[0] if len(kept) == 1 else None


def mc_accuracy(predictions: Sequence[str | None], answers: Sequence[str]) -> float:
    """Fraction of predicted letters equal to the gold letters; None (unparsed) is wrong."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("no questions to score")
    pairs = zip(predictions, answers, strict=True)
    correct = sum(p is not None and p == a.strip().upper() for p, a in pairs)
    return correct / len(answers)


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


def pope_yes_no(text: str) -> str:
    """LLaVA's ``eval_pope`` reading of an answer: "no" if the first sentence says no/not.

    Kept exactly as the reference: only text before the first "." counts, commas are removed,
    words are split on single spaces, and only the words "No", "no" and "not" mean no; anything
    else (including "NO" or "No!") is a yes.
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    # Zero denominators (e.g. no positive predictions) score 0 rather than raising.
    return num / den if den else 0.0


def pope_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.

    ``predictions`` are "yes"/"no" (see :func:`pope_yes_no`) or None for a failed question.
    A failed question is scored as the wrong label, so it lands in FN (label yes) or FP
    (label no); it is not a "yes" for the yes-ratio, which is yes answers / all questions.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no questions to score")
    tp = fp = tn = fn = yes = errors = 0
    for pred, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        if pred is None:
            errors += 1
            pred = "no" if label == "yes" else "yes"
        elif pred not in ("yes", "no"):
            raise ValueError(f"POPE prediction must be 'yes', 'no' or None, got {pred!r}")
        else:
            yes += pred == "yes"
        if pred == "yes":
            tp += label == "yes"
            fp += label == "no"
        else:
            tn += label == "no"
            fn += label == "yes"
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "n": len(labels),
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": yes / len(labels),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n_errors": errors,
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class ScorerInputError(ValueError):
    """Bad input file; the message names the file and, where it applies, the line."""


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    return read_records(path, ScorerInputError)


def _index_annotations(path: Path) -> dict[str, tuple[int, dict[str, Any]]]:
    index: dict[str, tuple[int, dict[str, Any]]] = {}
    for lineno, obj in _read_jsonl(path):
        qid = str(obj["question_id"])
        if qid in index:
            raise ScorerInputError(
                f"{path}:{lineno}: duplicate question_id {qid!r} (first on line {index[qid][0]})"
            )
        index[qid] = (lineno, obj)
    return index


def _paired(
    answers_path: Path, annotations_path: Path
) -> tuple[list[tuple[str | None, dict[str, Any], str]], int]:
    """Pair each answer with its annotation.

    Returns ([(answer text or None if failed, annotation, "file:line" of the annotation)],
    number of annotations that have no answer).
    """
    index = _index_annotations(annotations_path)
    pairs = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(answers_path):
        qid = str(obj["question_id"])
        where = f"{answers_path}:{lineno}"
        if qid in seen:
            raise ScorerInputError(
                f"{where}: duplicate question_id {qid!r} (first on line {seen[qid]})"
            )
        seen[qid] = lineno
        if qid not in index:
            raise ScorerInputError(
                f"{where}: question_id {qid!r} has no annotation in {annotations_path}"
            )
        if obj.get("error"):
            text = None
        else:
            text = obj.get("text")
            if not isinstance(text, str):
                raise ScorerInputError(f"{where}: 'text' must be a string (or give 'error')")
        ann_line, ann = index[qid]
        pairs.append((text, ann, f"{annotations_path}:{ann_line}"))
    if not pairs:
        raise ScorerInputError(f"{answers_path}: no answers")
    return pairs, len(index) - len(seen)


def score_vqa_file(answers: str | Path, annotations: str | Path) -> dict[str, Any]:
    """VQA accuracy (official and simple) over an answers file; see the module docstring."""
    pairs, unanswered = _paired(Path(answers), Path(annotations))
    official = simple = 0.0
    errors = 0
    for text, ann, where in pairs:
        gts = ann.get("answers")
        if not (isinstance(gts, list) and gts and all(isinstance(a, str) for a in gts)):
            raise ScorerInputError(f"{where}: 'answers' must be a non-empty list of strings")
        if text is None:
            errors += 1
            continue
        official += vqa_accuracy(text, gts)
        simple += vqa_accuracy_simple(text, gts)
    n = len(pairs)
    return {
        "task": "vqa",
        "n": n,
        "accuracy": official / n,
        "accuracy_simple": simple / n,
        "n_errors": errors,
        "n_annotations_unanswered": unanswered,
    }


def score_mc_file(answers: str | Path, annotations: str | Path) -> dict[str, Any]:
    """Multiple-choice accuracy over an answers file; see the module docstring."""
    pairs, unanswered = _paired(Path(answers), Path(annotations))
    preds: list[str | None] = []
    golds: list[str] = []
    errors = unparsed = 0
    for text, ann, where in pairs:
        gold = ann.get("answer")
        if not (isinstance(gold, str) and re.fullmatch(r"\s*[A-Za-z]\s*", gold)):
            raise ScorerInputError(f"{where}: 'answer' must be a single option letter")
        options = ann.get("options")
        if options is not None and not (
            (isinstance(options, list) and all(isinstance(o, str) for o in options))
            or (isinstance(options, dict) and all(isinstance(o, str) for o in options.values()))
        ):
            raise ScorerInputError(f"{where}: 'options' must be a list or mapping of strings")
        if text is None:
            errors += 1
            pred = None
        else:
            pred = extract_choice(text, options)
            unparsed += pred is None
        preds.append(pred)
        golds.append(gold)
    return {
        "task": "mc",
        "n": len(pairs),
        "accuracy": mc_accuracy(preds, golds),
        "n_correct": sum(p == g.strip().upper() for p, g in zip(preds, golds, strict=True)),
        "n_unparsed": unparsed,
        "n_errors": errors,
        "n_annotations_unanswered": unanswered,
    }


def score_pope_file(answers: str | Path, annotations: str | Path) -> dict[str, Any]:
    """POPE metrics over an answers file, plus a per-category breakdown if labels have one."""
    pairs, unanswered = _paired(Path(answers), Path(annotations))
    preds: list[str | None] = []
    labels: list[str] = []
    categories: list[str | None] = []
    for text, ann, where in pairs:
        label = ann.get("label")
        if label not in ("yes", "no"):
            raise ScorerInputError(f"{where}: 'label' must be 'yes' or 'no', got {label!r}")
        preds.append(None if text is None else pope_yes_no(text))
        labels.append(label)
        category = ann.get("category")
        categories.append(None if category is None else str(category))
    result: dict[str, Any] = {"task": "pope", **pope_metrics(preds, labels)}
    result["n_annotations_unanswered"] = unanswered
    names = sorted({c for c in categories if c is not None})
    if names:
        result["categories"] = {
            name: pope_metrics(
                [p for p, c in zip(preds, categories, strict=True) if c == name],
                [lab for lab, c in zip(labels, categories, strict=True) if c == name],
            )
            for name in names
        }
    return result


_SCORERS = {"vqa": score_vqa_file, "mc": score_mc_file, "pope": score_pope_file}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: score an answers file, print the metrics as JSON, optionally write them."""
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.evaluation.scorers",
        description="Score LLaVA-style answers (JSONL) against annotations (JSONL).",
    )
    parser.add_argument("task", choices=sorted(_SCORERS), help="which benchmark scorer")
    parser.add_argument("--answers", required=True, type=Path, help="answers JSONL")
    parser.add_argument("--annotations", required=True, type=Path, help="annotations JSONL")
    parser.add_argument("--out", type=Path, help="also write the metrics JSON here")
    args = parser.parse_args(argv)
    try:
        metrics = _SCORERS[args.task](args.answers, args.annotations)
    except ScorerInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
