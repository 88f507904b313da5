"""LLaVA's GPT-assisted instruction data (`python -m llava_jax.data.instruct`), against a real
OpenAI-compatible stand-in (`instruct_server.InstructServer`, on a free 127.0.0.1 port) that
answers from the messages it receives.

The small COCO-format fixture (`fixtures/coco_small`) has two good images and one of each bad
annotation; its contexts below are written by hand from its numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_openai import words
from instruct_server import InstructServer, default_reply
from PIL import Image
from test_judge import free_port, one_error_line
from trainer_fixtures import REPO

from llava_jax.data import annotations, instruct, instruct_output
from llava_jax.data import instruct_format as fmt
from llava_jax.data.conversation import IMAGE_PLACEHOLDER

FIXTURE = os.path.join(REPO, "tests", "fixtures", "coco_small")
CAPTIONS = os.path.join(FIXTURE, "captions.json")
INSTANCES = os.path.join(FIXTURE, "instances.json")
MODEL = "llm-test"

# The captions in annotation order, one a line (a caption's stray spaces and newline made one
# line); then each box's corners over the image's width and height, 3 decimals. The car's box
# reaches 0.4 px past the right edge: clipped to 1.000.
CONTEXT_1_CAPTIONS = (
    "A man rides a bicycle down a city street.\nA cyclist passes a row of parked cars."
)
CONTEXT_1 = (
    CONTEXT_1_CAPTIONS + "\n\n"
    "person: [0.500, 0.250, 0.600, 0.750]\n"  # [320, 120, 64, 240] in 640x480
    "bicycle: [0.469, 0.500, 0.625, 0.800]\n"  # [300, 240, 100, 144]
    "car: [0.000, 0.625, 1.000, 1.000]"  # [0, 300, 640.4, 180]
)
CONTEXT_2_CAPTIONS = "Two dogs play with a red ball on the grass."
CONTEXT_2 = (
    CONTEXT_2_CAPTIONS + "\n\n"
    "dog: [0.100, 0.500, 0.400, 0.900]\n"  # [32, 120, 96, 96] in 320x240
    "sports ball: [0.469, 0.833, 0.520, 0.900]"  # [150, 200, 16.5, 16]
)
IMAGE_1, IMAGE_2 = "000000000001.jpg", "000000000002.jpg"


def write_images(folder, names, size=(8, 8)) -> None:
    os.makedirs(folder, exist_ok=True)
    for index, name in enumerate(names):
        colour = (40 * index % 256, 100, 200)
        Image.new("RGB", size, colour).save(os.path.join(folder, name))


@pytest.fixture
def coco(tmp_path):
    """The fixture's image folder: images 1, 2 and 4 (3 is missing)."""
    images = tmp_path / "images"
    write_images(images, [IMAGE_1, IMAGE_2, "000000000004.jpg"])
    return {"images": str(images), "out": str(tmp_path / "out"), "root": tmp_path}


def coco_args(coco, url, *extra, out=None) -> list[str]:
    return [
        "--image-dir", coco["images"], "--captions", CAPTIONS, "--instances", INSTANCES,
        "--out", out or coco["out"], "--base-url", url, "--model", MODEL, "--no-progress",
        *extra,
    ]  # fmt: skip


def read_jsonl(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_bytes(*path: str) -> bytes:
    with open(os.path.join(*path), "rb") as f:
        return f.read()


def without_image(text: str) -> tuple[str, str]:
    """(the turn's text, where <image> was: 'first' or 'last')."""
    if text.startswith(IMAGE_PLACEHOLDER + "\n"):
        return text[len(IMAGE_PLACEHOLDER) + 1 :], "first"
    assert text.endswith("\n" + IMAGE_PLACEHOLDER), text
    return text[: -len(IMAGE_PLACEHOLDER) - 1], "last"


# --- annotations and their context ------------------------------------------------------------


def test_coco_annotations_give_llava_contexts_and_each_bad_one_is_skipped_by_name(coco):
    images, report = annotations.read_coco(CAPTIONS, INSTANCES, coco["images"])
    assert [(i.id, i.image) for i in images] == [
        ("000000000001", IMAGE_1),
        ("000000000002", IMAGE_2),
    ]
    assert annotations.render_context(images[0], with_boxes=True) == CONTEXT_1
    assert annotations.render_context(images[1], with_boxes=True) == CONTEXT_2
    assert annotations.render_context(images[0], with_boxes=False) == CONTEXT_1_CAPTIONS
    assert report.counts == {
        "unknown_image": 1,  # a caption of image_id 99
        "caption_not_text": 1,  # image 4's caption 42
        "box_outside_image": 1,  # [600, 100, 80, 50] in 640 wide
        "bad_box": 1,  # width 0
        "unknown_category": 1,  # category_id 99
        "missing_image": 1,  # image 3's file
        "no_captions": 1,  # image 4: its only caption was not text
    }
    details = {p.kind: (p.record_id, p.detail) for p in report.examples}
    assert details["box_outside_image"][0] == "000000000001"
    assert "annotations[3]" in details["box_outside_image"][1]
    assert "000000000003.jpg" in details["missing_image"][1]
    assert (report.total, report.kept) == (4, 2)


def test_jsonl_annotations_take_sizes_from_the_file_and_skip_bad_lines(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["a.png", "b.png"], size=(200, 100))
    lines = [
        json.dumps({"image": "a.png", "captions": ["A square."], "width": 400, "height": 200,
                    "boxes": [{"category": "kite", "bbox": [40, 20, 200, 100]}]}),
        "{not json",
        json.dumps({"image": "a.png", "captions": ["Again."]}),
        # no width/height: the file's own 200x100
        json.dumps({"image": "b.png", "id": "b-1", "captions": ["A circle.", ["no"]],
                    "boxes": [{"category": "ball", "bbox": [50, 25, 100, 50]},
                              {"bbox": [0, 0, 1, 1]}]}),
    ]  # fmt: skip
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    found, report = annotations.read_jsonl(str(path), str(images))
    assert [(i.id, i.image) for i in found] == [("a", "a.png"), ("b-1", "b.png")]
    assert (
        annotations.render_context(found[0], True)
        == "A square.\n\nkite: [0.100, 0.100, 0.600, 0.600]"
    )
    assert (
        annotations.render_context(found[1], True)
        == "A circle.\n\nball: [0.250, 0.250, 0.750, 0.750]"
    )
    assert report.counts == {
        "bad_json": 1, "duplicate_image": 1, "caption_not_text": 1, "unknown_category": 1
    }  # fmt: skip


# --- the requests -----------------------------------------------------------------------------


def _prompt_file(kind: str, name: str) -> str:
    with open(os.path.join(fmt.DEFAULT_PROMPTS, kind, name), encoding="utf-8") as f:
        return f.read().strip()


def test_each_request_is_the_system_message_the_few_shot_pairs_then_the_context(coco):
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, "--temperature", "0.7")) == 0
        requests = list(llm.requests)
    assert len(requests) == 6  # 2 images x 3 kinds, each asked once
    contexts = {
        ("conversation", IMAGE_1): CONTEXT_1_CAPTIONS,  # a conversation sees captions only
        ("conversation", IMAGE_2): CONTEXT_2_CAPTIONS,
        ("detail_description", IMAGE_1): CONTEXT_1,
        ("detail_description", IMAGE_2): CONTEXT_2,
        ("complex_reasoning", IMAGE_1): CONTEXT_1,
        ("complex_reasoning", IMAGE_2): CONTEXT_2,
    }
    seen = set()
    for request in requests:
        kind = request["kind"]
        expected = [{"role": "system", "content": _prompt_file(kind, "system_message.txt")}]
        for number in ("000", "001"):
            expected.append({"role": "user", "content": _prompt_file(kind, f"{number}_caps.txt")})
            expected.append(
                {"role": "assistant", "content": _prompt_file(kind, f"{number}_conv.txt")}
            )
        image = IMAGE_1 if "bicycle" in request["context"] else IMAGE_2
        expected.append({"role": "user", "content": contexts[(kind, image)]})
        assert request["messages"] == expected, (kind, image)
        assert request["body"]["model"] == MODEL and request["body"]["temperature"] == 0.7
        seen.add((kind, image))
    assert seen == set(contexts)


def test_the_default_replies_become_these_llava_records_in_annotation_order(coco):
    with InstructServer(model=MODEL) as llm:
        argv = coco_args(coco, llm.url, "--concurrency", "3", "--price-per-1k", "0.5,2")
        assert instruct.main(argv) == 0
        # the server counts a word a token: the prompt's words and the replies' words
        prompt_words = sum(words(m["content"]) for r in llm.requests for m in r["messages"])
        reply_words = sum(words(default_reply(r["kind"], r["context"])) for r in llm.requests)
    records = read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))
    expected_turns = [
        # image 1: conversation (a pair per caption), detail, reasoning; then image 2
        [("What is shown, view 1?", "A man rides a bicycle down a city street."),
         ("What is shown, view 2?", "A cyclist passes a row of parked cars.")],
        [(None, "A man rides a bicycle down a city street. A cyclist passes a row of parked "
                "cars. Objects: person, bicycle, car.")],
        [("Why might this scene matter?", "A man rides a bicycle down a city street. There "
                                          "are 3 objects to consider.")],
        [("What is shown, view 1?", "Two dogs play with a red ball on the grass.")],
        [(None, "Two dogs play with a red ball on the grass. Objects: dog, sports ball.")],
        [("Why might this scene matter?", "Two dogs play with a red ball on the grass. There "
                                          "are 2 objects to consider.")],
    ]  # fmt: skip
    assert len(records) == len(expected_turns)
    for index, (record, pairs) in enumerate(zip(records, expected_turns, strict=True)):
        image = IMAGE_1 if index < 3 else IMAGE_2
        assert record["id"] == image[:-4] and record["image"] == image
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(pairs)
        first, _ = without_image(turns[0]["value"])
        for k, (question, answer) in enumerate(pairs):
            asked = first if k == 0 else turns[2 * k]["value"]
            if question is None:  # a detailed description: an instruction of the paper's list
                assert asked in fmt.DETAIL_INSTRUCTIONS
            else:
                assert asked == question
            assert turns[2 * k + 1]["value"] == answer
        # <image> once, in the first human turn
        assert sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) == 1
    # the same inputs and seed give the same file, byte for byte
    with InstructServer(model=MODEL) as llm:
        again = os.path.join(coco["root"], "again")
        assert instruct.main(coco_args(coco, llm.url, out=again)) == 0
    assert file_bytes(coco["out"], instruct_output.OUT_JSON) == file_bytes(
        again, instruct_output.OUT_JSON
    )
    report = read_json(os.path.join(coco["out"], instruct_output.REPORT_FILE))
    assert report["records"] == {
        "conversation": 2, "detail_description": 2, "complex_reasoning": 2
    }  # fmt: skip
    assert report["annotations"]["counts"]["missing_image"] == 1
    assert report["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": reply_words}
    assert report["estimated_cost"] == pytest.approx(prompt_words / 1000 * 0.5 + reply_words / 500)


# --- replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, pairs",
    [
        ("Question:\nWhat is it?\n===\nAnswer:\nA dog.\n===\nQuestion:\nHow many?\n===\n"
         "Answer:\nTwo.", [("What is it?", "A dog."), ("How many?", "Two.")]),
        # labels with their text on the same line, spaces, a trailing ===, a multi-line answer
        ("  Question: What is it?\n===\nAnswer: A dog\nthat sleeps.\n===\n",
         [("What is it?", "A dog\nthat sleeps.")]),
        # blocks without === between them
        ("Question:\nWhere?\nAnswer:\nOn the left.", [("Where?", "On the left.")]),
    ],
)  # fmt: skip
def test_question_answer_replies_parse_into_pairs(reply, pairs):
    assert fmt.parse_reply(fmt.CONVERSATION, reply) == pairs


@pytest.mark.parametrize(
    "kind, reply, reason",
    [
        (fmt.CONVERSATION, "", "empty_reply"),
        (fmt.CONVERSATION, None, "empty_reply"),
        (fmt.DETAIL, "  \n ", "empty_reply"),
        (fmt.CONVERSATION, "Sure! Here it is.\nQuestion:\nWhat?\n===\nAnswer:\nA cat.",
         "unparsable"),
        (fmt.CONVERSATION, "Answer:\nA cat.", "unparsable"),
        (fmt.CONVERSATION, "Question:\nWhat?\n===\nAnswer:\nA cat.\n===\nQuestion:\nWhy?",
         "unparsable"),
        (fmt.CONVERSATION, "Question:\nWhat?\n===\nAnswer:\n\n===", "unparsable"),
        (fmt.CONVERSATION, "A plain description.", "unparsable"),
        (fmt.REASONING, "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.",
         "unparsable"),
        (fmt.DETAIL, "Question:\nWhat?\n===\nAnswer:\nA cat.", "unparsable"),
        (fmt.DETAIL, "As the captions say, a cat sleeps.", "leaks_source"),
        (fmt.CONVERSATION, "Question:\nWhere?\n===\nAnswer:\nIts bounding box is left.",
         "leaks_source"),
        (fmt.REASONING, "Question:\nWhere?\n===\nAnswer:\nBy the Coordinates given, left.",
         "leaks_source"),
    ],
)  # fmt: skip
def test_replies_that_make_no_record_say_why(kind, reply, reason):
    with pytest.raises(fmt.ReplyError) as caught:
        fmt.parse_reply(kind, reply)
    assert caught.value.reason == reason


def test_failures_are_retried_then_counted_and_a_rerun_asks_only_for_what_is_left(coco):
    args = ["--kind", "conversation", "--retries", "4", "--parse-retries", "2"]
    with InstructServer(model=MODEL) as llm:
        # image 1: the endpoint fails four ways, then answers (each retried, not counted)
        llm.script("city street", 429, 500, "garbage-json", "drop")
        # image 2: three replies that name their source: skipped with the reason
        leak = "Question:\nWhat is there?\n===\nAnswer:\nThe caption mentions two dogs."
        llm.script("red ball", leak, leak, leak)
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        assert llm.outcomes("city street") == [429, 500, "garbage-json", "drop", 200]
        assert llm.count("red ball") == 3
        skipped = read_jsonl(os.path.join(coco["out"], instruct_output.SKIPPED_FILE))
        assert len(skipped) == 1 and skipped[0]["image"] == IMAGE_2
        assert skipped[0]["reason"] == "leaks_source" and skipped[0]["attempts"] == 3
        assert skipped[0]["reply"] == leak and "caption" in skipped[0]["detail"]
        report = read_json(os.path.join(coco["out"], instruct_output.REPORT_FILE))
        assert report["records"] == {"conversation": 1}
        assert report["skipped"] == {"conversation": {"leaks_source": 1}}
        assert report["retries_this_run"] == 4
        records = read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))
        assert [r["image"] for r in records] == [IMAGE_1]

        # the same command again: everything is done or skipped, nothing is asked
        asked = len(llm.requests)
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        assert len(llm.requests) == asked
        # a skipped line removed is asked for again, and now answered
        open(os.path.join(coco["out"], instruct_output.SKIPPED_FILE), "w").close()
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        assert llm.count("red ball") == 4 and len(llm.requests) == asked + 1
    records = read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))
    assert [r["image"] for r in records] == [IMAGE_1, IMAGE_2]


def test_an_endpoint_failing_past_the_retries_is_counted_and_the_run_goes_on(coco):
    args = ["--kind", "complex_reasoning", "--retries", "1", "--concurrency", "1"]
    with InstructServer(model=MODEL) as llm:
        llm.script("city street", None, None, None)  # three replies without text
        llm.script("red ball", 503, 503)
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
    skipped = {
        s["image"]: s for s in read_jsonl(os.path.join(coco["out"], instruct_output.SKIPPED_FILE))
    }
    assert skipped[IMAGE_1]["reason"] == "empty_reply"
    assert skipped[IMAGE_2]["reason"] == "request_failed"
    assert "503" in skipped[IMAGE_2]["detail"] and "--retries 1" in skipped[IMAGE_2]["detail"]
    assert read_json(os.path.join(coco["out"], instruct_output.OUT_JSON)) == []


# --- resume -------------------------------------------------------------------------------------


def _many_images(tmp_path, count: int) -> tuple[str, str]:
    images = tmp_path / "images"
    names = [f"scene_{k:02d}.png" for k in range(count)]
    write_images(images, names, size=(64, 48))
    path = tmp_path / "notes.jsonl"
    with open(path, "w") as f:
        for k, name in enumerate(names):
            box = {"category": "kite", "bbox": [k, 2, 20, 10]}
            note = {"image": name, "captions": [f"Scene {k} has a kite.", f"A sky, number {k}."],
                    "boxes": [box], "width": 64, "height": 48}  # fmt: skip
            f.write(json.dumps(note) + "\n")
    return str(images), str(path)


def _wait_for_lines(path: str, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(read_jsonl(path)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path}: fewer than {count} lines"
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_a_kill_mid_run_and_a_rerun_give_the_records_of_an_uninterrupted_run(tmp_path):
    images, notes = _many_images(tmp_path, 8)
    kinds = ["--kind", "conversation,complex_reasoning"]

    def args(url: str, out: str) -> list[str]:
        return ["--image-dir", images, "--annotations", notes, "--out", out, "--base-url", url,
                "--model", MODEL, "--no-progress", "--concurrency", "3", *kinds]  # fmt: skip

    whole = str(tmp_path / "whole")
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(args(llm.url, whole)) == 0
    cut = str(tmp_path / "cut")
    with InstructServer(model=MODEL) as llm:
        llm.hold(5)  # five answers, then every request waits
        process = subprocess.Popen(
            [sys.executable, "-m", "llava_jax.data.instruct", *args(llm.url, cut)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_lines(os.path.join(cut, instruct_output.DONE_FILE), 5, process)
        time.sleep(0.3)  # the held requests in flight
        process.send_signal(signal.SIGKILL)
        process.wait()
        llm.release()
        assert llm.held > 0  # the kill came with requests in flight
        first_answers = len(llm.answered)
        assert len(read_jsonl(os.path.join(cut, instruct_output.DONE_FILE))) == first_answers == 5
        llm.hold(None)
        assert instruct.main(args(llm.url, cut)) == 0
        # nothing answered twice: 16 (image, kind) pairs, 16 answers in both runs together
        assert len(llm.answered) == 16
        assert len(set(llm.answered)) == 16
    done = read_jsonl(os.path.join(cut, instruct_output.DONE_FILE))
    assert len({(d["image"], d["kind"]) for d in done}) == len(done) == 16
    assert file_bytes(whole, instruct_output.OUT_JSON) == file_bytes(cut, instruct_output.OUT_JSON)


def test_a_last_line_cut_short_is_asked_for_again(coco):
    args = ["--kind", "detail_description", "--concurrency", "1"]
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        done_path = os.path.join(coco["out"], instruct_output.DONE_FILE)
        with open(done_path, "rb") as f:
            data = f.read()
        with open(done_path, "wb") as f:  # a kill while writing the second line
            f.write(data[: len(data) - 20])
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        assert len(llm.requests) == 3
    assert len(read_jsonl(done_path)) == 2
    assert len(read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))) == 2


# --- stage 1 ------------------------------------------------------------------------------------


def test_brief_makes_a_pretraining_record_per_caption_without_an_llm(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["x.png"])
    captions = [f"caption number {k}" for k in range(12)]
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"image": "x.png", "captions": captions}) + "\n")
    out = tmp_path / "out"
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    argv = ["--image-dir", str(images), "--annotations", str(notes), "--out", str(out),
            "--kind", "brief", "--base-url", unreachable, "--no-progress"]  # fmt: skip
    assert instruct.main(argv) == 0
    records = read_json(out / instruct_output.OUT_JSON)
    assert [r["conversations"][1]["value"] for r in records] == captions
    places = set()
    for record in records:
        assert record["image"] == "x.png" and record["id"] == "x"
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        text, place = without_image(human["value"])
        assert text in fmt.BRIEF_INSTRUCTIONS
        places.add(place)
    assert places == {"first", "last"}


# --- bad input ----------------------------------------------------------------------------------


def test_a_prompt_folder_without_a_pair_is_refused_before_any_request(coco, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    for kind in fmt.LLM_KINDS:
        (prompts / kind).mkdir(parents=True)
        (prompts / kind / "system_message.txt").write_text("You look at an image.\n")
        (prompts / kind / "000_caps.txt").write_text("A cat.\n")
        (prompts / kind / "000_conv.txt").write_text("Question:\nWhat?\n===\nAnswer:\nA cat.\n")
    (prompts / "conversation" / "001_caps.txt").write_text("A dog.\n")
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, "--prompts", str(prompts))) == 2
        assert llm.requests == []
    line = one_error_line(capsys.readouterr().err)
    assert "001_conv.txt: no such file" in line


def test_a_rerun_with_another_model_or_seed_is_refused_naming_it(coco, capsys):
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, "--kind", "conversation")) == 0
        capsys.readouterr()
        for extra, said in (
            (["--seed", "3"], "--seed 3"),
            (["--temperature", "0.2"], "--temperature 0.2"),
        ):
            assert instruct.main(coco_args(coco, llm.url, "--kind", "conversation", *extra)) == 2
            line = one_error_line(capsys.readouterr().err)
            assert said in line and "other inputs" in line
        asked = len(llm.requests)
    assert asked == 2


@pytest.mark.parametrize(
    "problem", ["no model", "no annotations", "missing captions file", "wrong model", "bad kind"]
)
def test_bad_settings_are_one_line(coco, capsys, problem):
    with InstructServer(model=MODEL) as llm:
        argv = coco_args(coco, llm.url)
        if problem == "no model":
            argv.remove("--model")
            argv.remove(MODEL)
        elif problem == "no annotations":
            argv = [a for a in argv if a not in ("--captions", CAPTIONS, "--instances", INSTANCES)]
        elif problem == "missing captions file":
            argv[argv.index(CAPTIONS)] = CAPTIONS + ".missing"
        elif problem == "wrong model":
            argv[argv.index(MODEL)] = "gpt-9"
        else:
            argv += ["--kind", "conversation,poems"]
        assert instruct.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    expected = {
        "no model": "--model is needed",
        "no annotations": "--captions",
        "missing captions file": "captions.json.missing: cannot read",
        "wrong model": "404 for model 'gpt-9'",
        "bad kind": "poems",
    }[problem]
    assert expected in line, line


def test_records_whose_image_does_not_decode_are_left_out_named_and_taken_once_mended(coco):
    broken = os.path.join(coco["images"], IMAGE_2)
    with open(broken, "rb") as f:
        good = f.read()
    with open(broken, "wb") as f:
        f.write(good[:40])  # a JPEG cut short: the file is there, its pixels are not
    args = ["--kind", "conversation"]
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        report = read_json(os.path.join(coco["out"], instruct_output.REPORT_FILE))
        assert [(i["image"], i["kind"]) for i in report["invalid"]] == [(IMAGE_2, "conversation")]
        assert "unreadable_image" in report["invalid"][0]["problem"]
        assert report["skipped"] == {"conversation": {"invalid_record": 1}}
        records = read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))
        assert [r["image"] for r in records] == [IMAGE_1]
        with open(broken, "wb") as f:
            f.write(good)
        asked = len(llm.requests)
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        assert len(llm.requests) == asked  # its records were kept: nothing asked again
    records = read_json(os.path.join(coco["out"], instruct_output.OUT_JSON))
    assert [r["image"] for r in records] == [IMAGE_1, IMAGE_2]


def test_a_damaged_or_repeated_done_line_is_named(coco, capsys):
    args = ["--kind", "conversation", "--concurrency", "1"]
    with InstructServer(model=MODEL) as llm:
        assert instruct.main(coco_args(coco, llm.url, *args)) == 0
        capsys.readouterr()
        done_path = os.path.join(coco["out"], instruct_output.DONE_FILE)
        with open(done_path) as f:
            first, second = f.read().splitlines()
        for text, said in (
            (f"{first[:30]}\n{second}\n", "done.jsonl:1"),
            (f"{first}\n{second}\n{first}\n", "recorded a second time"),
        ):
            with open(done_path, "w") as f:
                f.write(text)
            assert instruct.main(coco_args(coco, llm.url, *args)) == 2
            assert said in one_error_line(capsys.readouterr().err)
        assert len(llm.requests) == 2
