"""Scorers: VQA normalisation and accuracy, multiple-choice letters, POPE, and the CLI.

Expected values are worked out by hand in the comments, not produced by running the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_jax.evaluation import (
    ScorerInputError,
    extract_choice,
    mc_accuracy,
    normalize_vqa_answer,
    pope_metrics,
    pope_yes_no,
    score_mc_file,
    score_pope_file,
    score_vqa_file,
    vqa_accuracy,
    vqa_accuracy_simple,
)
from llava_jax.evaluation.scorers import main
from llava_jax.evaluation.vqa_normalize import process_punctuation

# ---------------------------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Articles a/an/the are dropped after lower-casing.
        ("The dog", "dog"),
        ("an apple", "apple"),
        ("A cat on a mat", "cat on mat"),
        # Number words -> digits; "none" is a number word in the reference.
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        # Trailing period removed (not followed by a digit), then "two" -> "2".
        ("Two.", "2"),
        ("dog.", "dog"),
        # A period followed by a digit is a decimal point and stays; the final one goes.
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        # Digit-comma-digit anywhere: every punctuation mark is deleted, so 1,000 == 1000.
        ("1,000", "1000"),
        ("1000", "1000"),
        ("1,000 dogs!", "1000 dogs"),
        # ", " touches a space: the comma is deleted (not turned into a space).
        ("yes, it is", "yes it is"),
        # A comma touching no space (and no digits) becomes a space.
        ("red,blue", "red blue"),
        # "-" touches no space -> space; "!" has no space before or after -> space, then split.
        ("red-white!", "red white"),
        # Contractions written without apostrophes are restored; lower-casing comes first.
        ("dont", "don't"),
        ("Youre right", "you're right"),
        ("it isnt", "it isn't"),
        ("couldnt've", "couldn't've"),
        # Apostrophes and colons are not in the reference punctuation list: untouched.
        ("don't", "don't"),
        ("10:30", "10:30"),
        # Tabs, newlines and repeated spaces collapse.
        ("  big\tred\n bus ", "big red bus"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_process_punctuation_bracket_rule() -> None:
    # "(a) cat": "(" has no space on either side -> " "; ") " occurs -> ")" deleted.
    assert process_punctuation("(a) cat") == " a cat"
    # ... and the article "a" then disappears in the digit/article pass.
    assert normalize_vqa_answer("(a) cat") == "cat"


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------


def _annotators(n_match: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "official", "simple"),
    [
        # Leave one of 10 annotators out, count matches among the other 9, min(count/3, 1):
        # 0 match: every subset 0 -> 0.
        (0, 0.0, 0.0),
        # 1 match: leaving it out -> 0 (1 subset); leaving another out -> 1/3 (9 subsets).
        #   (0 + 9 * 1/3) / 10 = 3/10 = 0.3.          simple: 1/3
        (1, 0.3, 1 / 3),
        # 2 match: leaving a match out -> 1/3 (2 subsets); else -> 2/3 (8 subsets).
        #   (2/3 + 16/3) / 10 = 6/10 = 0.6.           simple: 2/3
        (2, 0.6, 2 / 3),
        # 3 match: leaving a match out -> 2/3 (3 subsets); else -> 1 (7 subsets).
        #   (2 + 7) / 10 = 0.9.                       simple: 1
        (3, 0.9, 1.0),
        # 4 match: every subset keeps >= 3 matches -> 1.
        (4, 1.0, 1.0),
        (10, 1.0, 1.0),
    ],
)
def test_vqa_accuracy_ten_annotators(n_match: int, official: float, simple: float) -> None:
    gts = _annotators(n_match)
    assert vqa_accuracy("2", gts) == pytest.approx(official)
    assert vqa_accuracy_simple("2", gts) == pytest.approx(simple)


def test_vqa_accuracy_normalises_both_sides() -> None:
    # "Two." -> "2"; the annotators' "2", "two" and "2." all normalise to "2": 3 matches -> 0.9.
    gts = ["2", "two", "2.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two.", gts) == pytest.approx(0.9)
    # Without normalisation no annotator's text equals "Two." literally -> 0.
    assert vqa_accuracy("Two.", gts, normalize=False) == 0.0
    # "1,000" vs "1000" x 10: equal after normalisation -> 1.
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0


def test_vqa_accuracy_single_reference_and_empty() -> None:
    # One reference cannot be left out: exact match after normalisation.
    assert vqa_accuracy("The dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("dog", [])


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        ("A", None, "A"),
        ("(B)", None, "B"),
        ("b.", None, "B"),
        ("[D]", None, "D"),
        ("The answer is C.", None, "C"),
        ("C. cat", None, "C"),
        ("(C) cat", None, "C"),
        ("Answer: D", None, "D"),
        ("The correct option is (B).", None, "B"),
        ("I think B", None, "B"),  # "I think": the pronoun, not option I
        # Restated options do not compete with the stated answer.
        ("Option A is a cat and option B is a dog. The answer is B.", None, "B"),
        ("Option C is correct.", None, "C"),
        # Options given: the letter must be one of them (3 options -> A-C).
        ("D", ["x", "y", "z"], None),
        # The answer repeats an option's text.
        ("dog", ["cat", "dog"], "B"),
        ("Dog.", {"A": "cat", "B": "dog"}, "B"),
        ("It is a dog.", ["cat", "dog"], "B"),
        # "A cat ...": the article, not option A; "cat" is option B.
        ("A cat is on the mat", ["dog", "cat"], "B"),
        # "Vitamin C" is option A's text, not the letter C.
        ("The answer is Vitamin C", ["Vitamin C", "Vitamin D"], "A"),
        # "red" is inside "dark red": the longer option wins.
        ("It's dark red.", ["red", "dark red"], "B"),
        # Unanswerable or ambiguous -> None.
        ("", None, None),
        ("I don't know", None, None),
        ("The answer is A or the answer is B", None, None),
        ("a cat", ["dog", "bird"], None),
    ],
)
def test_extract_choice(text: str, options: object, expected: str | None) -> None:
    assert extract_choice(text, options) == expected  # type: ignore[arg-type]


def test_mc_accuracy_counts_none_as_wrong() -> None:
    # Right, right, unparsed, wrong -> 2/4.
    assert mc_accuracy(["A", "B", None, "C"], ["A", "b", "C", "D"]) == 0.5
    with pytest.raises(ValueError):
        mc_accuracy(["A"], ["A", "B"])


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("no", "no"),
        # Only the first sentence counts.
        ("Yes. There is no cat though.", "yes"),
        # Reference quirks kept: "NO" and "No!" are not the words "No"/"no".
        ("NO", "yes"),
        ("No!", "yes"),
    ],
)
def test_pope_yes_no(text: str, expected: str) -> None:
    assert pope_yes_no(text) == expected


def test_pope_metrics_confusion_matrix() -> None:
    labels = ["yes"] * 5 + ["no"] * 5
    # yes-labels: yes yes yes no no -> TP 3, FN 2; no-labels: yes no no no no -> FP 1, TN 4.
    preds = ["yes", "yes", "yes", "no", "no", "yes", "no", "no", "no", "no"]
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 1, 4)
    assert m["accuracy"] == pytest.approx(0.7)  # (3 + 4) / 10
    assert m["precision"] == pytest.approx(0.75)  # 3 / (3 + 1)
    assert m["recall"] == pytest.approx(0.6)  # 3 / (3 + 2)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * .75 * .6 / 1.35 = .9 / 1.35
    assert m["yes_ratio"] == pytest.approx(0.4)  # 4 yes answers / 10
    assert m["n_errors"] == 0


def test_pope_metrics_errors_and_degenerate() -> None:
    # Failed question on a yes-label -> FN; on a no-label -> FP; neither is a yes answer.
    m = pope_metrics([None, None, "yes", "no"], ["yes", "no", "yes", "no"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["n_errors"] == 2
    assert m["yes_ratio"] == 0.25  # only the third answer said yes
    # Never answering yes: precision, recall and F1 are 0 rather than a division error.
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="label"):
        pope_metrics(["yes"], ["maybe"])


# ---------------------------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [
            {"question_id": 1, "text": "Two"},
            {"question_id": "2", "text": "", "error": "generation failed"},
            {"question_id": 3, "text": "yes"},
        ],
    )
    annotations = _write_jsonl(
        tmp_path / "annotations.jsonl",
        [
            {"question_id": 1, "answers": _annotators(2)},
            {"question_id": 2, "answers": ["dog"] * 10},
            {"question_id": 3, "answers": ["yes"] * 10},
            {"question_id": 4, "answers": ["no"] * 10},
        ],
    )
    return answers, annotations


def test_cli_vqa_round_trip(
    vqa_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers, annotations = vqa_files
    out = tmp_path / "sub" / "metrics.json"
    argv = ["vqa", "--answers", str(answers), "--annotations", str(annotations)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    # q1 "Two" -> "2", 2 of 10 match: 0.6 (simple 2/3); q2 failed: 0; q3 10 of 10: 1.
    assert printed["accuracy"] == pytest.approx((0.6 + 0 + 1) / 3)
    assert printed["accuracy_simple"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert printed["n"] == 3 and printed["n_errors"] == 1
    assert printed["n_annotations_unanswered"] == 1  # q4


def test_cli_module_entry_point(vqa_files: tuple[Path, Path]) -> None:
    answers, annotations = vqa_files
    cmd = [sys.executable, "-m", "llava_jax.evaluation.scorers", "vqa"]
    cmd += ["--answers", str(answers), "--annotations", str(annotations)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(proc.stdout)["n_errors"] == 1
    assert "Warning" not in proc.stderr  # e.g. runpy's "found in sys.modules" warning


def test_score_mc_file(tmp_path: Path) -> None:
    answers = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"question_id": 1, "text": "The answer is B."},
            {"question_id": 2, "text": "cat"},
            {"question_id": 3, "text": "I don't know"},
            {"question_id": 4, "error": "timeout"},
        ],
    )
    annotations = _write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"question_id": 1, "answer": "B"},
            {"question_id": 2, "answer": "B", "options": {"A": "dog", "B": "cat"}},
            {"question_id": 3, "answer": "A", "options": ["yes", "no"]},
            {"question_id": 4, "answer": "A"},
        ],
    )
    m = score_mc_file(answers, annotations)
    # Right, right (option text), unparsed, failed -> 2/4.
    assert m["accuracy"] == 0.5 and m["n_correct"] == 2
    assert (m["n_unparsed"], m["n_errors"], m["n"]) == (1, 1, 4)


def test_score_pope_file_with_categories(tmp_path: Path) -> None:
    answers = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"question_id": 1, "text": "Yes, there is."},  # yes, label yes: TP
            {"question_id": 2, "text": "No, there is not."},  # no, label yes: FN
            {"question_id": 3, "text": "There is a cup."},  # yes, label no: FP
            {"question_id": 4, "text": "No."},  # no, label no: TN
        ],
    )
    annotations = _write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"question_id": 1, "label": "yes", "category": "random"},
            {"question_id": 2, "label": "yes", "category": "random"},
            {"question_id": 3, "label": "no", "category": "adversarial"},
            {"question_id": 4, "label": "no", "category": "adversarial"},
        ],
    )
    m = score_pope_file(answers, annotations)
    # TP 1, FN 1, FP 1, TN 1: accuracy 2/4, precision 1/2, recall 1/2, F1 1/2, yes 2/4.
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["yes_ratio"] == 0.5
    # random: TP 1, FN 1 -> accuracy 1/2, precision 1/1, recall 1/2.
    rnd = m["categories"]["random"]
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"]) == (0.5, 1.0, 0.5)
    # adversarial: FP 1, TN 1 -> accuracy 1/2, no true positives -> precision 0.
    adv = m["categories"]["adversarial"]
    assert (adv["accuracy"], adv["precision"], adv["fp"]) == (0.5, 0.0, 1)


# ---------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 2, "text"\n')
    annotations = _write_jsonl(tmp_path / "g.jsonl", [{"question_id": 1, "answers": ["a"]}])
    # Line 2 is blank and skipped; line 3 is broken.
    with pytest.raises(ScorerInputError, match=r"answers\.jsonl:3: malformed JSON"):
        score_vqa_file(answers, annotations)


def test_missing_annotation_names_both_files(tmp_path: Path) -> None:
    answers = _write_jsonl(
        tmp_path / "answers.jsonl",
        [{"question_id": 1, "text": "a"}, {"question_id": 7, "text": "b"}],
    )
    annotations = _write_jsonl(tmp_path / "g.jsonl", [{"question_id": 1, "answers": ["a"]}])
    with pytest.raises(ScorerInputError, match=r"answers\.jsonl:2: question_id '7' .*g\.jsonl"):
        score_vqa_file(answers, annotations)


@pytest.mark.parametrize(
    ("task", "annotation", "message"),
    [
        ("vqa", {"question_id": 1, "answers": []}, r"g\.jsonl:1: 'answers' must be"),
        ("mc", {"question_id": 1, "answer": "AB"}, r"g\.jsonl:1: 'answer' must be"),
        ("mc", {"question_id": 1, "answer": "A", "options": "x"}, r"g\.jsonl:1: 'options'"),
        ("pope", {"question_id": 1, "label": "Yes!"}, r"g\.jsonl:1: 'label' must be"),
    ],
)
def test_bad_annotation_fields(
    tmp_path: Path, task: str, annotation: dict[str, object], message: str
) -> None:
    answers = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "A"}])
    annotations = _write_jsonl(tmp_path / "g.jsonl", [annotation])
    scorer = {"vqa": score_vqa_file, "mc": score_mc_file, "pope": score_pope_file}[task]
    with pytest.raises(ScorerInputError, match=message):
        scorer(answers, annotations)


def test_duplicates_and_missing_fields(tmp_path: Path) -> None:
    good = _write_jsonl(tmp_path / "g.jsonl", [{"question_id": 1, "label": "yes"}])
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 1, "text": "yes"}] * 2)
    with pytest.raises(ScorerInputError, match=r"dup\.jsonl:2: duplicate question_id '1'"):
        score_pope_file(dup, good)
    no_id = _write_jsonl(tmp_path / "noid.jsonl", [{"text": "yes"}])
    with pytest.raises(ScorerInputError, match=r"noid\.jsonl:1: missing 'question_id'"):
        score_pope_file(no_id, good)
    no_text = _write_jsonl(tmp_path / "notext.jsonl", [{"question_id": 1}])
    with pytest.raises(ScorerInputError, match=r"notext\.jsonl:1: 'text' must be a string"):
        score_pope_file(no_text, good)


def test_cli_reports_errors_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pope", "--answers", str(tmp_path / "nope.jsonl"), "--annotations", "x.jsonl"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.jsonl: cannot read" in err
