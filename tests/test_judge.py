"""The LLaVA-Bench judge (`python -m llava_jax.evaluation.judge`) against a stand-in GPT-4:
`tests/judge_server.py`, a real HTTP server on a free localhost port that scores each answer
by the `(score N)` the test wrote in it, so every figure here is computed by hand from the
scores chosen below.

What is held: the judge reads LLaVA's prompt, section by section, for each form of context
(In-the-Wild's caption as a string and as a list, COCO's captions and boxes); the reviews are
LLaVA's format and LLaVA's own `summarize_gpt_review.py`, run as a script, prints our
figures; a run killed mid-way loses nothing and judges nothing twice; a failing judge (429,
500, unparsable replies, timeouts, dropped connections) is retried, then counted failed, and
the run completes; `--runs` and `--swap` give the spread and the position bias computed by
hand; a wrong URL, key or model, bad flags and bad benchmark files get one `error:` line and
exit status 2, before anything is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest
from judge_server import GARBAGE, JudgeServer

from llava_jax.evaluation import judge, llava_bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAVA_EVAL = os.path.join(os.path.dirname(importlib.util.find_spec("llava").origin), "eval")
MODEL = "judge-test"

# (question_id, image, category, reference score, model score)
SCORES = [
    ("q1", "wild_string.jpg", "conv", 8, 6),
    ("q2", "wild_list.jpg", "conv", 9, 7),
    ("q3", "coco.jpg", "detail", 8, 4),
    ("q4", "wild_string.jpg", "detail", 7, 5),
    ("q5", "wild_list.jpg", "complex", 10, 9),
    ("q6", "coco.jpg", "complex", 6, 6),
]
CONTEXTS = [
    {"image": "wild_string.jpg", "caption": "A grey cat sleeps on a red mat."},
    {"image": "wild_list.jpg", "caption": ["A dog runs on a beach.", "The dog is brown."]},
    {
        "image": "coco.jpg",
        "captions": ["Two people ride bikes.", "A street with cars."],
        "instances": [
            {"category": "person", "bbox": [0.1, 0.2, 0.3, 0.45]},
            {"category": "bicycle", "bbox": [0.5, 0.25, 0.75, 1.0]},
        ],
    },
]
# The [Context] sections as LLaVA's scripts write them, by hand.
CONTEXT_TEXT = {
    "wild_string.jpg": "A grey cat sleeps on a red mat.",
    "wild_list.jpg": "A dog runs on a beach.\nThe dog is brown.",
    "coco.jpg": "Two people ride bikes.\nA street with cars.\n\n"
    "person: [0.1, 0.2, 0.3, 0.45]\nbicycle: [0.5, 0.25, 0.75, 1.0]",
}
RULES = {
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the conversation answers."},
    "llava_bench_detail": {"role": "Assistant", "prompt": "Rate the detailed descriptions."},
    "llava_bench_complex": {"role": "AI assistant", "prompt": "Rate the reasoning."},
    "coding": {"role": "Assistant", "prompt": "another benchmark's rule, not read"},
}
CATEGORIES = ("conv", "detail", "complex")


def question_text(qid: str) -> str:
    return f"What is in picture {qid}?"


def reference_text(qid: str, score: float) -> str:
    return f"The reference answer to {qid}. (score {score})"


def model_text(qid: str, score: float) -> str:
    return f"The model's answer to {qid}. (score {score})"


def write_jsonl(path, records) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_benchmark(root) -> dict[str, str]:
    """A benchmark in LLaVA's layout, its rule file and the model's answers, in `root`."""
    bench = os.path.join(root, "bench")
    os.makedirs(os.path.join(bench, "images"))
    write_jsonl(
        os.path.join(bench, "questions.jsonl"),
        [
            {"question_id": q, "image": image, "text": question_text(q), "category": category}
            for q, image, category, _, _ in SCORES
        ],
    )
    write_jsonl(os.path.join(bench, "context.jsonl"), CONTEXTS)
    write_jsonl(
        os.path.join(bench, "answers_gpt4.jsonl"),
        [
            {"question_id": q, "text": reference_text(q, r), "answer_id": f"ref-{q}"}
            for q, _, _, r, _ in SCORES
        ],
    )
    rule = os.path.join(root, "rule.json")
    with open(rule, "w") as f:
        json.dump(RULES, f)
    answers = os.path.join(root, "answers.jsonl")
    write_jsonl(
        answers,
        [
            {
                "question_id": q,
                "prompt": question_text(q),
                "text": model_text(q, m),
                "answer_id": f"model-{q}",
                "model_id": "tiny",
                "metadata": {},
            }
            for q, _, _, _, m in SCORES
        ],
    )
    return {"bench": bench, "rule": rule, "answers": answers, "out": os.path.join(root, "out")}


def judge_args(paths, url: str, *extra: str) -> list[str]:
    return [
        "--benchmark", paths["bench"], "--answers", paths["answers"], "--out", paths["out"],
        "--rule", paths["rule"], "--judge-base-url", url, "--judge-model", MODEL,
        "--no-progress", *extra,
    ]  # fmt: skip


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def write_text(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def one_error_line(err: str) -> str:
    """stderr is exactly one `error: ...` line, without a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hand_figures(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """(reference, model) scores -> LLaVA's figures: a ratio of means."""
    reference = sum(r for r, _ in pairs) / len(pairs)
    model = sum(m for _, m in pairs) / len(pairs)
    return {
        "reference_mean": reference,
        "model_mean": model,
        "relative_score": model / reference * 100,
    }


def by_category(rows, pick) -> dict[str, list]:
    """rows (q, image, category, ref, model) -> per category and `all`, pick(row) each."""
    result = {c: [pick(row) for row in rows if row[2] == c] for c in CATEGORIES}
    result["all"] = [pick(row) for row in rows]
    return result


def llava_printed(figures: dict) -> tuple[float, float, float]:
    """Our means, passed through summarize_gpt_review.py's rounding: means to 3 decimals,
    then the relative score and the x10 columns to 1."""
    reference = round(figures["reference_mean"]["mean"], 3)
    model = round(figures["model_mean"]["mean"], 3)
    return (round(model / reference * 100, 1), round(reference * 10, 1), round(model * 10, 1))


def run_llava_summary(path) -> dict[str, tuple[float, float, float]]:
    """LLaVA's own summarize_gpt_review.py on a review file: {category: its three numbers}."""
    script = os.path.join(LLAVA_EVAL, "summarize_gpt_review.py")
    done = subprocess.run(
        [sys.executable, script, "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    printed = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and (parts[0] == "all" or parts[0].startswith("llava_bench_")):
            printed[parts[0].removeprefix("llava_bench_")] = tuple(float(x) for x in parts[1:])
    return printed


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def paths(tmp_path):
    return write_benchmark(tmp_path)


# --- the prompt ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_judge_is_asked_llava_s_prompt_for_every_form_of_context(paths, capsys):
    with JudgeServer(model=MODEL) as server:
        assert judge.main(judge_args(paths, server.url)) == 0
    assert sorted(r["question"] for r in server.requests) == sorted(
        question_text(q) for q, *_ in SCORES
    )
    for q, image, category, r, m in SCORES:
        (request,) = [x for x in server.requests if x["question"] == question_text(q)]
        role = RULES[f"llava_bench_{category}"]["role"]
        prompt = RULES[f"llava_bench_{category}"]["prompt"]
        expected = (
            f"[Context]\n{CONTEXT_TEXT[image]}\n\n"
            f"[Question]\n{question_text(q)}\n\n"
            f"[{role} 1]\n{reference_text(q, r)}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{model_text(q, m)}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n"
        )
        assert request["messages"] == [
            {
                "role": "system",
                "content": "You are a helpful and precise assistant for checking the quality "
                "of the answer.",
            },
            {"role": "user", "content": expected},
        ]
        body = request["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == (MODEL, 0.2, 1024)


@pytest.mark.timeout(30)
def test_parse_score_is_llava_s_but_says_unparsable_instead_of_minus_one():
    spec = importlib.util.spec_from_file_location(
        "llava_review_bench", os.path.join(LLAVA_EVAL, "eval_gpt_review_bench.py")
    )
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    reviews = [
        "8 7\nbecause",
        "8,7",
        "8.5 6\r\nwhy",
        "10 3",
        "8, 7",  # LLaVA's split on single spaces: three parts
        "8 7 ",
        " 8 7",
        "8\t7",
        "Scores: 8 7",
        "",
        "eight seven",
        GARBAGE,
    ]
    for review in reviews:
        ours = llava_bench.parse_score(review)
        expected = theirs.parse_score(review)
        assert (list(ours) if ours else [-1, -1]) == expected, review
    # where we part from LLaVA: a non-finite score is unparsable, never averaged in
    assert llava_bench.parse_score("nan 3") is None and llava_bench.parse_score("8 inf") is None


# --- the reviews, the figures, and LLaVA's own summary ------------------------------------------


@pytest.mark.timeout(60)
def test_figures_equal_a_hand_computation_and_llava_s_summary_prints_them(paths, capsys):
    with JudgeServer(model=MODEL) as server:
        assert judge.main(judge_args(paths, server.url)) == 0
    table = capsys.readouterr().out
    out = paths["out"]
    reviews = read_jsonl(os.path.join(out, "reviews.jsonl"))
    # LLaVA's review format, in question order
    assert [r["id"] for r in reviews] == [1, 2, 3, 4, 5, 6]
    for review, (q, _, category, r, m) in zip(reviews, SCORES, strict=True):
        assert review["question_id"] == q
        assert review["answer1_id"] == f"ref-{q}" and review["answer2_id"] == f"model-{q}"
        assert review["category"] == f"llava_bench_{category}"
        assert review["tuple"] == [r, m]
        assert review["content"].startswith(f"{r} {m}\n")
    assert not os.path.exists(os.path.join(out, "failed.jsonl"))

    summary = load_json(os.path.join(out, "summary.json"))
    hand = by_category(SCORES, lambda row: (row[3], row[4]))
    for category, pairs in hand.items():
        ours = summary["figures"][category]
        for name, value in hand_figures(pairs).items():
            assert ours[name]["mean"] == pytest.approx(value), (category, name)
            assert ours[name]["std"] is None  # one run
        assert ours["count"]["mean"] == len(pairs) and ours["failed"]["mean"] == 0
    assert summary["figures"]["all"]["relative_score"]["mean"] == pytest.approx(37 / 48 * 100)
    assert "77.1" in table and "all" in table

    printed = run_llava_summary(os.path.join(out, "reviews.jsonl"))
    assert set(printed) == {"conv", "detail", "complex", "all"}
    for category, numbers in printed.items():
        assert numbers == llava_printed(summary["figures"][category]), category

    # the summary again, from the reviews alone
    os.remove(os.path.join(out, "summary.json"))
    os.remove(os.path.join(out, "summary.png"))
    assert judge.main(["summarize", "--out", out]) == 0
    assert load_json(os.path.join(out, "summary.json")) == summary
    with open(os.path.join(out, "summary.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_llava_compat_keeps_llava_s_minus_ones_which_its_summary_averages_and_ours_names(
    paths, capsys
):
    with JudgeServer(model=MODEL) as server:
        server.fail(question_text("q3"), "garbage")
        args = judge_args(paths, server.url, "--llava-compat", "--parse-retries", "0")
        assert judge.main(args) == 0
    table = capsys.readouterr().out
    out = paths["out"]
    reviews = read_jsonl(os.path.join(out, "reviews.jsonl"))
    (bad,) = [r for r in reviews if r["question_id"] == "q3"]
    assert bad["tuple"] == [-1, -1] and bad["content"] == GARBAGE and "failed" in bad
    assert server.count(question_text("q3")) == 1  # --parse-retries 0: asked once, as LLaVA
    assert not os.path.exists(os.path.join(out, "failed.jsonl"))

    summary = load_json(os.path.join(out, "summary.json"))
    assert summary["unparsable_averaged_in_by_llava"] == 1
    # ours: q3 left out (and counted failed) ...
    kept = [row for row in SCORES if row[0] != "q3"]
    for category, pairs in by_category(kept, lambda row: (row[3], row[4])).items():
        figures = summary["figures"][category]
        assert figures["relative_score"]["mean"] == pytest.approx(
            hand_figures(pairs)["relative_score"]
        )
        assert figures["failed"]["mean"] == (1 if category in ("detail", "all") else 0)
    # ... LLaVA's: averaged in as -1, -1, and that is what its own script prints
    llava_way = [row if row[0] != "q3" else (*row[:3], -1, -1) for row in SCORES]
    for category, pairs in by_category(llava_way, lambda row: (row[3], row[4])).items():
        assert summary["llava_figures"][category]["relative_score"]["mean"] == pytest.approx(
            hand_figures(pairs)["relative_score"]
        )
    printed = run_llava_summary(os.path.join(out, "reviews.jsonl"))
    for category, numbers in printed.items():
        assert numbers == llava_printed(summary["llava_figures"][category]), category
    assert printed["detail"] != llava_printed(summary["figures"]["detail"])
    assert "--llava-compat: 1 unparsable review recorded as [-1, -1]" in table


@pytest.mark.timeout(60)
def test_runs_and_swap_give_the_spread_and_position_bias_computed_by_hand(paths, capsys):
    bias, offsets = 1.0, (0.0, 2.0)  # Assistant 2 gets +1; the second run +2 more
    with JudgeServer(model=MODEL, position_bias=bias, repeat_offsets=offsets) as server:
        args = judge_args(paths, server.url, "--runs", "2", "--swap", "--concurrency", "1")
        assert judge.main(args) == 0
    out = paths["out"]
    names = sorted(n for n in os.listdir(out) if n.startswith("reviews"))
    assert names == [
        "reviews-run1.jsonl",
        "reviews-run2.jsonl",
        "reviews-swapped-run1.jsonl",
        "reviews-swapped-run2.jsonl",
    ]
    # a swapped review: judged as (model, reference), recorded as (reference, model)
    swapped = read_jsonl(os.path.join(out, "reviews-swapped-run2.jsonl"))[0]
    assert swapped["order"] == "model_first"
    assert swapped["judged_tuple"] == [6, 8 + bias + offsets[1]]
    assert swapped["tuple"] == [8 + bias + offsets[1], 6]

    summary = load_json(os.path.join(out, "summary.json"))
    for category, rows in by_category(SCORES, lambda row: (row[3], row[4])).items():
        straight = [
            hand_figures([(r, m + bias + off) for r, m in rows])["relative_score"]
            for off in offsets
        ]
        ours = summary["figures"][category]["relative_score"]
        assert ours["runs"] == pytest.approx(straight)
        assert ours["mean"] == pytest.approx(statistics.mean(straight))
        assert ours["std"] == pytest.approx(statistics.stdev(straight))
        # each side scores 1 + offset more as Assistant 2 than as Assistant 1
        position = summary["position_bias"][category]
        for side in ("model", "reference"):
            assert position[side]["runs"] == pytest.approx([bias + off for off in offsets])
            assert position[side]["std"] == pytest.approx(statistics.stdev([1.0, 3.0]))
        both = [
            sum(2 * m + bias + off for _, m in rows)
            / sum(2 * r + bias + off for r, _ in rows)
            * 100
            for off in offsets
        ]
        averaged = position["relative_score_order_averaged"]
        assert averaged["runs"] == pytest.approx(both)
        assert averaged["mean"] == pytest.approx(statistics.mean(both))
        assert position["paired"]["mean"] == len(rows)
    table = capsys.readouterr().out
    assert "position bias" in table and "±" in table


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_run_killed_mid_way_loses_nothing_and_judges_nothing_twice(paths):
    out = paths["out"]
    reviews_path = os.path.join(out, "reviews.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with JudgeServer(model=MODEL) as server:
        server.hold(3)  # three answers, then the requests wait: the kill comes mid-flight
        command = [sys.executable, "-m", "llava_jax.evaluation.judge"]
        process = subprocess.Popen(
            [*command, *judge_args(paths, server.url, "--concurrency", "2")],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while server.held < 2 or len(read_jsonl(reviews_path)) < 3:
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the judge never got mid-way"
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
        server.release()  # the two requests in flight are never answered
        asked_first = len(server.requests)
        first = [r["question_id"] for r in read_jsonl(reviews_path)]
        assert len(first) >= 3 and len(first) == asked_first - 2
        # as if killed in the middle of writing a line, too
        with open(reviews_path, "a") as f:
            f.write('{"id": 4, "question_id": "q4", "answer1_id": "ref-q4", "answ')

        assert judge.main(judge_args(paths, server.url, "--concurrency", "2")) == 0
        assert sorted(server.answered) == sorted(question_text(q) for q, *_ in SCORES)
        again = [r["question"] for r in server.requests[asked_first:]]  # the rerun's
        assert not {question_text(q) for q in first} & set(again)
        reviews = read_jsonl(reviews_path)
        assert [r["question_id"] for r in reviews] == [q for q, *_ in SCORES]
        assert [r["tuple"] for r in reviews] == [[r, m] for _, _, _, r, m in SCORES]

        # a third run has nothing to do: no request
        before = len(server.requests)
        assert judge.main(judge_args(paths, server.url)) == 0
        assert len(server.requests) == before


@pytest.mark.timeout(60)
def test_a_rerun_with_other_inputs_or_settings_is_refused_naming_them(paths, capsys):
    with JudgeServer(model=MODEL) as server:
        assert judge.main(judge_args(paths, server.url)) == 0
        capsys.readouterr()
        before = read_text(os.path.join(paths["out"], "reviews.jsonl"))
        cases = [
            (["--judge-model", "other-judge"], ["--judge-model", "other-judge", MODEL]),
            (["--temperature", "0"], ["--temperature 0.0", "0.2"]),
            (["--runs", "2"], ["--runs 2"]),
            (["--swap"], ["--swap true"]),
        ]
        for extra, named in cases:
            assert judge.main(judge_args(paths, server.url, *extra)) == 2
            line = one_error_line(capsys.readouterr().err)
            assert "holds reviews made with other inputs" in line
            for word in named:
                assert word in line, (extra, line)
        with open(paths["answers"], "a") as f:
            f.write("\n")  # the same answers, another file
        assert judge.main(judge_args(paths, server.url)) == 2
        assert "--answers" in one_error_line(capsys.readouterr().err)
        requests = len(server.requests)
    assert requests == len(SCORES)  # none of the refused runs asked anything
    assert read_text(os.path.join(paths["out"], "reviews.jsonl")) == before


@pytest.mark.timeout(60)
def test_a_damaged_review_line_is_named_and_a_torn_last_line_judged_again(paths, capsys):
    with JudgeServer(model=MODEL) as server:
        assert judge.main(judge_args(paths, server.url)) == 0
        reviews_path = os.path.join(paths["out"], "reviews.jsonl")
        lines = read_text(reviews_path).split("\n")
        write_text(reviews_path, "\n".join([lines[0], "{not json", *lines[2:]]))
        capsys.readouterr()
        assert judge.main(judge_args(paths, server.url)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "reviews.jsonl:2" in line and "remove the line" in line
        # the same line cut short at the end (a kill while writing): dropped, judged again
        write_text(reviews_path, "\n".join([lines[0], *lines[2:-1], lines[1][:30]]))
        assert judge.main(judge_args(paths, server.url)) == 0
        assert server.count(question_text("q2")) == 2
    reviews = read_jsonl(reviews_path)
    assert [r["question_id"] for r in reviews] == [q for q, *_ in SCORES]


# --- a judge that fails ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_failing_judge_is_retried_then_counted_failed_and_the_run_completes(paths, capsys):
    answers = read_jsonl(paths["answers"])
    answers[4] = {"question_id": "q5", "text": "", "error": "image not found: x.jpg"}
    write_jsonl(paths["answers"], answers)
    with JudgeServer(model=MODEL, slow_s=1.5) as server:
        q = {row[0]: question_text(row[0]) for row in SCORES}
        server.fail(q["q1"], 429, 500)  # then answers
        server.fail(q["q2"], "timeout")  # then answers
        server.fail(q["q3"], *["garbage"] * 4)  # never parses: 1 + --parse-retries 3
        server.fail(q["q4"], 500, 503, 500)  # past --retries 2
        server.fail(q["q6"], "drop", "garbage")  # connection lost, then a reply to ask again
        args = judge_args(paths, server.url, "--retries", "2", "--timeout", "0.5")
        assert judge.main(args) == 0
    assert server.outcomes(q["q1"]) == [429, 500, "scored"]
    assert server.outcomes(q["q2"]) == ["timeout", "scored"]
    assert server.outcomes(q["q3"]) == ["garbage"] * 4
    assert server.outcomes(q["q4"]) == [500, 503, 500]
    assert server.outcomes(q["q5"]) == []  # the model failed it: nothing to judge
    assert server.outcomes(q["q6"]) == ["drop", "garbage", "scored"]

    out = paths["out"]
    assert [r["question_id"] for r in read_jsonl(os.path.join(out, "reviews.jsonl"))] == [
        "q1", "q2", "q6"
    ]  # fmt: skip
    failed = {f["question_id"]: f for f in read_jsonl(os.path.join(out, "failed.jsonl"))}
    assert set(failed) == {"q3", "q4", "q5"}
    assert failed["q3"]["content"] == GARBAGE and failed["q3"]["attempts"] == 4
    assert "did not parse" in failed["q3"]["reason"]
    assert "3 times" in failed["q4"]["reason"] and "HTTP 500" in failed["q4"]["reason"]
    assert "image not found: x.jpg" in failed["q5"]["reason"]

    summary = load_json(os.path.join(out, "summary.json"))
    kept = [row for row in SCORES if row[0] in ("q1", "q2", "q6")]
    for category, pairs in by_category(kept, lambda row: (row[3], row[4])).items():
        figures = summary["figures"][category]
        if pairs:
            assert figures["relative_score"]["mean"] == pytest.approx(
                hand_figures(pairs)["relative_score"]
            )
        assert figures["count"]["mean"] == len(pairs)
    assert summary["figures"]["detail"]["relative_score"]["mean"] is None  # none reviewed
    failed_counts = [summary["figures"][c]["failed"]["mean"] for c in (*CATEGORIES, "all")]
    assert failed_counts == [0, 2, 1, 3]
    assert "failed, left out of the figures (3)" in capsys.readouterr().out

    with JudgeServer(model=MODEL) as server:
        # a failure is a record: the same command again asks nothing ...
        assert judge.main(judge_args(paths, server.url)) == 0
        assert server.requests == []
        # ... until its record is removed: then exactly those questions are judged again
        os.remove(os.path.join(out, "failed.jsonl"))
        assert judge.main(judge_args(paths, server.url)) == 0
        assert sorted(r["question"] for r in server.requests) == [q["q3"], q["q4"]]
    failed = read_jsonl(os.path.join(out, "failed.jsonl"))
    assert [f["question_id"] for f in failed] == ["q5"]
    assert len(read_jsonl(os.path.join(out, "reviews.jsonl"))) == 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "problem", ["wrong url", "no /v1 in the url", "wrong key", "unknown model", "refused request"]
)
def test_a_judge_that_cannot_be_used_is_one_line_after_one_request(
    paths, capsys, monkeypatch, problem
):
    with JudgeServer(model=MODEL, api_key="the-key") as server:
        monkeypatch.setenv("OPENAI_API_KEY", "the-key")
        url, extra = server.url, []
        if problem == "wrong url":
            url = f"http://127.0.0.1:{free_port()}/v1"
        elif problem == "no /v1 in the url":
            url = url.removesuffix("/v1")
        elif problem == "wrong key":
            monkeypatch.setenv("OPENAI_API_KEY", "a-wrong-key")
        elif problem == "unknown model":
            extra = ["--judge-model", "gpt-9"]
        else:
            server.fail(question_text("q1"), 400)
        args = judge_args(paths, url, "--concurrency", "4", *extra)
        assert judge.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    expected = {
        "wrong url": ["cannot reach the judge", url, "--judge-base-url"],
        "no /v1 in the url": ["404", "--judge-base-url"],
        "wrong key": ["refused the API key (401", "OPENAI_API_KEY"],
        "unknown model": ["404 for model 'gpt-9'", "--judge-model"],
        "refused request": ["refused the request (400", "--max-tokens"],
    }[problem]
    for word in expected:
        assert word in line, line
    assert len(server.requests) == (0 if problem == "wrong url" else 1)
    out = paths["out"]
    assert not any(n.startswith(("reviews", "failed")) for n in os.listdir(out))


# --- bad input ------------------------------------------------------------------------------------


def _edit_jsonl(path, edit) -> None:
    records = read_jsonl(path)
    edit(records)
    write_jsonl(path, records)


def _rewrite_line(path, number, text) -> None:
    lines = read_text(path).split("\n")
    lines[number - 1] = text
    write_text(path, "\n".join(lines))


BAD_BENCHMARKS = {
    "a question line that is not JSON": (
        lambda p: _rewrite_line(f"{p['bench']}/questions.jsonl", 2, '{"question_id": "q2",'),
        ["questions.jsonl:2", "malformed JSON"],
    ),
    "a question without text": (
        lambda p: _edit_jsonl(f"{p['bench']}/questions.jsonl", lambda r: r[0].pop("text")),
        ["questions.jsonl:1", "'text'"],
    ),
    "a duplicate question id": (
        lambda p: _edit_jsonl(
            f"{p['bench']}/questions.jsonl", lambda r: r[1].update(question_id="q1")
        ),
        ["questions.jsonl:2", "duplicate question_id 'q1'", "line 1"],
    ),
    "a question whose image has no context": (
        lambda p: _edit_jsonl(
            f"{p['bench']}/questions.jsonl", lambda r: r[0].update(image="x.jpg")
        ),
        ["questions.jsonl:1", "'x.jpg' has no context", "context.jsonl"],
    ),
    "a category the rule lacks": (
        lambda p: _edit_jsonl(
            f"{p['bench']}/questions.jsonl", lambda r: r[2].update(category="ocr")
        ),
        ["questions.jsonl:3", "'llava_bench_ocr'", "rule.json"],
    ),
    "a question without a reference": (
        lambda p: _edit_jsonl(f"{p['bench']}/answers_gpt4.jsonl", lambda r: r.pop(1)),
        ["questions.jsonl:2", "'q2'", "no reference answer", "answers_gpt4.jsonl"],
    ),
    "a reference to no question": (
        lambda p: _edit_jsonl(
            f"{p['bench']}/answers_gpt4.jsonl",
            lambda r: r.append({"question_id": "q99", "text": "?"}),
        ),
        ["answers_gpt4.jsonl:7", "'q99'"],
    ),
    "a caption that is neither text nor a list": (
        lambda p: _edit_jsonl(f"{p['bench']}/context.jsonl", lambda r: r[0].update(caption=5)),
        ["context.jsonl:1", "'caption'"],
    ),
    "a context without a caption": (
        lambda p: _edit_jsonl(f"{p['bench']}/context.jsonl", lambda r: r[1].pop("caption")),
        ["context.jsonl:2", "'caption'", "'captions'"],
    ),
    "a COCO box of three numbers": (
        lambda p: _edit_jsonl(
            f"{p['bench']}/context.jsonl", lambda r: r[2]["instances"][1].update(bbox=[1, 2, 3])
        ),
        ["context.jsonl:3", "'instances'[1]", "'bbox'"],
    ),
    "COCO captions without instances": (
        lambda p: _edit_jsonl(f"{p['bench']}/context.jsonl", lambda r: r[2].pop("instances")),
        ["context.jsonl:3", "'instances'"],
    ),
    "two contexts for one image": (
        lambda p: _edit_jsonl(f"{p['bench']}/context.jsonl", lambda r: r.append(dict(r[0]))),
        ["context.jsonl:4", "second context", "'wild_string.jpg'", "first: 1"],
    ),
    "a missing context file": (
        lambda p: os.remove(f"{p['bench']}/context.jsonl"),
        ["context.jsonl", "not found"],
    ),
    "a missing benchmark folder": (
        lambda p: p.update(bench=p["bench"] + "-nowhere"),
        ["benchmark folder", "bench-nowhere", "not found"],
    ),
    "a rule without its prompt": (
        lambda p: write_text(
            p["rule"], json.dumps({**RULES, "llava_bench_conv": {"role": "Assistant"}})
        ),
        ["rule.json", "'llava_bench_conv'", "'prompt'"],
    ),
    "a rule file that is not JSON": (
        lambda p: write_text(p["rule"], "{'llava_bench_conv': 1}"),
        ["rule.json", "malformed JSON"],
    ),
    "no answer to a question": (
        lambda p: _edit_jsonl(p["answers"], lambda r: r.pop()),
        ["answers.jsonl", "no answer to 1 of the benchmark's 6 questions", "'q6'"],
    ),
    "two answers to a question": (
        lambda p: _edit_jsonl(p["answers"], lambda r: r.append(dict(r[0]))),
        ["answers.jsonl:7", "second answer", "'q1'"],
    ),
    "an answer to another benchmark": (
        lambda p: _edit_jsonl(p["answers"], lambda r: r[5].update(question_id=60)),
        ["answers.jsonl:6", "question_id 60"],
    ),
    "an answer without text": (
        lambda p: _edit_jsonl(p["answers"], lambda r: r[0].update(text=None)),
        ["answers.jsonl:1", "'text'"],
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("problem", list(BAD_BENCHMARKS))
def test_bad_benchmark_files_are_one_line_naming_them_before_anything(paths, capsys, problem):
    spoil, named = BAD_BENCHMARKS[problem]
    spoil(paths)
    # a closed port: a request would fail otherwise, and nothing may be asked anyway
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert judge.main(judge_args(paths, url)) == 2
    line = one_error_line(capsys.readouterr().err)
    for word in named:
        assert word in line, line
    assert not os.path.exists(paths["out"])


@pytest.mark.timeout(30)
def test_check_images_names_a_missing_image(paths):
    with pytest.raises(llava_bench.BenchmarkError, match=r"questions.jsonl:1: .*wild_string.jpg"):
        llava_bench.load_benchmark(paths["bench"], paths["rule"], check_images=True)
    for name in ("wild_string.jpg", "wild_list.jpg", "coco.jpg"):
        open(os.path.join(paths["bench"], "images", name), "wb").close()
    loaded = llava_bench.load_benchmark(paths["bench"], paths["rule"], check_images=True)
    assert [q.index for q in loaded.questions] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "extra, named",
    [
        (["--concurrency", "0"], "--concurrency must be >= 1, got 0"),
        (["--retries", "-1"], "--retries must be >= 0"),
        (["--parse-retries", "-2"], "--parse-retries must be >= 0"),
        (["--runs", "0"], "--runs must be >= 1"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--timeout", "0"], "--timeout must be > 0 seconds"),
        (["--temperature", "nan"], "--temperature must be between 0 and 2"),
        (["--judge-base-url", "localhost:8000/v1"], "--judge-base-url must be an http(s) URL"),
        (["--judge-base-url", "https://api.openai.com/v1"], "OPENAI_API_KEY is not set"),
    ],
)
def test_bad_flags_are_one_line_exit_2(paths, capsys, extra, named):
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert judge.main(judge_args(paths, url, *extra)) == 2
    assert named in one_error_line(capsys.readouterr().err)
    assert not os.path.exists(paths["out"])


@pytest.mark.timeout(30)
def test_unknown_flags_and_a_missing_out_are_argparse_s_exit_2(paths, capsys):
    with pytest.raises(SystemExit) as exit_:
        judge.main([*judge_args(paths, "http://127.0.0.1:1/v1"), "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err.strip().split("\n")[-1]
    assert judge.main(["summarize", "--out", paths["out"]]) == 2
    assert "is not a folder" in one_error_line(capsys.readouterr().err)
