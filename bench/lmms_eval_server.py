"""lmms-eval, the ecosystem's LMM harness, against `python -m llava_jax.serve`.

    python bench/lmms_eval_server.py --checkpoint workdir/tiny \\
        --lmms-python /tmp/lmms_venv/bin/python [--num-questions 20] [--keep DIR]
    python bench/lmms_eval_server.py --write-task DIR [--num-questions 20]

Writes a small local lmms-eval task (`bench/lmms_eval_task/`: held-out synthetic-shape
images, one question each, scored by exact match ignoring case and punctuation), starts
our server on a free port, runs lmms-eval's OpenAI-compatible model (`--model openai`)
on the task through it, stops the server, then answers the same questions with
`python -m llava_jax.evaluate` (the checkpoint in-process, no server) and scores them
the same way. Prints lmms-eval's results table, both accuracies, how many answers are the
same (greedy decoding on the same pixels: all of them, unless something differs between
the two paths) and the times.

lmms-eval runs in its own environment (`--lmms-python`; its dependencies are heavy), with
the hub off (HF_HUB_OFFLINE=1): nothing is downloaded. `--write-task DIR` only writes the
task (yaml, utils.py, shapes_test.jsonl, images/), to run lmms-eval by hand:

    OPENAI_API_KEY=none OPENAI_API_BASE=http://127.0.0.1:8000/v1 HF_HUB_OFFLINE=1 \\
        python -m lmms_eval --model openai --model_args model=tiny \\
        --tasks llava_jax_shapes --include_path DIR --batch_size 1 --output_path out/
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_SOURCE = os.path.join(REPO, "bench", "lmms_eval_task")
TASK = "llava_jax_shapes"
MODEL_NAME = "llava-tiny"
MAX_NEW_TOKENS = 16  # as the task's generation_kwargs
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def write_task(directory: str, num_questions: int, image_size: int = 48, seed: int = 0) -> str:
    """The task in `directory`: its yaml and utils.py, `shapes_test.jsonl` (lmms-eval's
    documents), `questions.jsonl` (the same questions for `llava_jax.evaluate`) and
    `images/`. Each held-out record gives its first question (the one with the image)."""
    from llava_jax.data.datasets.synthetic import make_record

    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for name in ("llava_jax_shapes.yaml", "utils.py"):
        shutil.copy(os.path.join(TASK_SOURCE, name), os.path.join(directory, name))
    with (
        open(os.path.join(directory, "shapes_test.jsonl"), "w") as docs,
        open(os.path.join(directory, "questions.jsonl"), "w") as questions,
    ):
        for index in range(num_questions):
            record = make_record(index, "test", seed=seed, image_size=image_size, style="instruct")
            image = f"images/{index:06d}.png"
            with open(os.path.join(directory, image), "wb") as f:
                f.write(record.image_bytes[0])
            question = record.conversations[0]["value"].replace("<image>\n", "")
            answer = record.conversations[1]["value"]
            doc = {"id": record.id, "image": image, "question": question, "answer": answer}
            docs.write(json.dumps(doc) + "\n")
            line = {"question_id": record.id, "image": image, "text": question}
            questions.write(json.dumps(line) + "\n")
    return directory


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def normalise(text: str) -> str:
    """lmms-eval's exact_match with ignore_case and ignore_punctuation (whitespace kept)."""
    return text.lower().translate(_PUNCTUATION)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {url}/health in {timeout_s:.0f} s")


def lmms_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('lmms_eval'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


def run_lmms_eval(python: str, base_url: str, task_dir: str, out_dir: str) -> tuple[str, float]:
    """lmms-eval's stdout (its results table) and wall time."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": os.path.join(out_dir, "hf_datasets"),
        "OPENAI_API_KEY": "none",
        "OPENAI_API_BASE": base_url,
    }
    command = [
        python, "-m", "lmms_eval",
        "--model", "openai",
        "--model_args", f"model={MODEL_NAME},num_concurrent=8",
        "--tasks", TASK,
        "--include_path", task_dir,
        "--batch_size", "1",
        "--output_path", out_dir,
        "--log_samples",
        "--verbosity", "WARNING",
    ]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise RuntimeError(f"lmms-eval exited with code {result.returncode}")
    return result.stdout, seconds


def lmms_outputs(out_dir: str, docs: list[dict]) -> tuple[float, dict[str, str]]:
    """lmms-eval's exact_match (its results file) and its answer to each document (its
    --log_samples file, by document index), keyed by the document's id."""
    found = {}
    for kind in ("results.json", f"samples_{TASK}.jsonl"):
        paths = glob.glob(os.path.join(out_dir, "**", f"*_{kind}"), recursive=True)
        if not paths:  # lmms-eval logs an error and exits 0
            raise RuntimeError(f"lmms-eval wrote no *_{kind} under {out_dir}: see its output")
        found[kind] = max(paths, key=os.path.getmtime)
    with open(found["results.json"]) as f:
        score = json.load(f)["results"][TASK]["exact_match,none"]
    answers = {}
    for sample in read_jsonl(found[f"samples_{TASK}.jsonl"]):
        response = sample["filtered_resps"]
        response = response[0] if isinstance(response, list) else response
        answers[docs[sample["doc_id"]]["id"]] = response
    return score, answers


def run_evaluate(checkpoint: str, task_dir: str, extra: list[str]) -> tuple[dict, float]:
    """`python -m llava_jax.evaluate`'s answer to each question, and its wall time."""
    out = os.path.join(task_dir, "answers.jsonl")
    command = [
        sys.executable, "-m", "llava_jax.evaluate",
        "--checkpoint", checkpoint,
        "--questions", os.path.join(task_dir, "questions.jsonl"),
        "--out", out,
        "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--temperature", "0",
        "--no-progress",
        *extra,
    ]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {answer["question_id"]: answer["text"] for answer in read_jsonl(out)}, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="workdir or model folder to serve")
    parser.add_argument(
        "--lmms-python",
        default=os.environ.get("LMMS_PYTHON", sys.executable),
        help="python of the environment with lmms-eval (default $LMMS_PYTHON or this one)",
    )
    parser.add_argument(
        "--num-questions", type=int, default=20, help="held-out records asked (one question each)"
    )
    parser.add_argument("--write-task", metavar="DIR", help="only write the task to DIR")
    parser.add_argument("--keep", metavar="DIR", help="write the task and outputs here, kept")
    parser.add_argument("--start-timeout", type=float, default=300, help="server start, s")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an extra argument for the server, e.g. --serve-arg=--quantize --serve-arg=int8",
    )
    args = parser.parse_args()
    if args.write_task:
        write_task(args.write_task, args.num_questions)
        print(f"wrote the task {TASK} ({args.num_questions} questions) to {args.write_task}")
        return 0
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --write-task DIR)")

    work = args.keep or tempfile.mkdtemp(prefix="lmms_eval_llava_")
    task_dir, out_dir = os.path.join(work, "task"), os.path.join(work, "lmms_out")
    write_task(task_dir, args.num_questions)
    docs = read_jsonl(os.path.join(task_dir, "shapes_test.jsonl"))
    version = lmms_version(args.lmms_python)
    print(f"lmms-eval {version or '(not found)'} ({args.lmms_python}), {len(docs)} questions")

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server_command = [
        sys.executable, "-m", "llava_jax.serve",
        "--checkpoint", args.checkpoint,
        "--port", str(port),
        "--model-name", MODEL_NAME,
        *args.serve_arg,
    ]  # fmt: skip
    print("$ " + " ".join(server_command), flush=True)
    log_path = os.path.join(work, "server.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(server_command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base_url, server, args.start_timeout)
        print(f"server up in {time.perf_counter() - start:.1f} s (log: {log_path})")
        table, lmms_seconds = run_lmms_eval(args.lmms_python, base_url + "/v1", task_dir, out_dir)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(table.rstrip())
    lmms_score, served = lmms_outputs(out_dir, docs)
    ours, evaluate_seconds = run_evaluate(args.checkpoint, task_dir, [])

    def accuracy(answers: dict) -> float:
        right = sum(normalise(answers.get(d["id"], "")) == normalise(d["answer"]) for d in docs)
        return right / len(docs)

    failed = sum(text.startswith("[LMMS_EVAL_REQUEST_FAILED") for text in served.values())
    same = sum(served.get(d["id"]) == ours.get(d["id"]) for d in docs)
    print(
        f"\nlmms-eval through the server: exact_match {lmms_score:.4f} (rescored here: "
        f"{accuracy(served):.4f}; {len(served)} answers, {failed} failed requests; "
        f"{lmms_seconds:.1f} s for lmms-eval, start-up included)\n"
        f"llava_jax.evaluate (no server): exact_match {accuracy(ours):.4f} "
        f"({len(ours)} answers, {evaluate_seconds:.1f} s, start-up included)\n"
        f"the same answer from both: {same} of {len(docs)}"
    )
    for doc in docs:
        theirs, mine = served.get(doc["id"]), ours.get(doc["id"])
        if theirs != mine or normalise(mine or "") != normalise(doc["answer"]):
            print(
                f"  {doc['id']} {doc['question']!r}: expected {doc['answer']!r}, "
                f"lmms-eval {theirs!r}, evaluate {mine!r}"
            )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
