"""Talk with a model about an image, turn after turn (LLaVA's `serve.cli`).

    python -m llava_jax.chat --checkpoint WORKDIR_OR_MODEL_DIR --image cat.jpg \\
        [--max-new-tokens 512 --temperature 0.2 --top-k 0 --top-p 1 --seed 0 --template NAME \\
        --quantize int8]

`--image` may be repeated (several images, each with its `<image>\\n` in front of the first
question, in order), and a LLaVA-OneVision model takes `--video PATH [--frames 32]` (one
`<image>` after the images), as `generate` does.

Each turn reads `USER: `, then prints `ASSISTANT: ` and the answer as it is generated
(`Engine.stream`). The template renders the whole conversation every turn, the image
(`<image>\\n` in front of the first question) included, so the model sees the history.
`exit` or `quit`, end of input (Ctrl-D) or Ctrl-C at the prompt leave (exit code 0); an
empty line is ignored; Ctrl-C while an answer streams drops that turn. A turn that would
not fit the model's context prints an error and is left out of the history; when the
answer might not fit, it gets the room that is left. A line that is not valid UTF-8 or
writes `<image>` where no image goes (after the first turn, or without `--image`) is
left out the same way: one `error: ...` line, and the chat goes on. Sampled turns use
`seed + turn`. `--quantize int8`: the decoder's attention and MLP weights in int8
(`llava_jax/models/quantize.py`). Start-up problems (a missing image or checkpoint, an
unknown template or `--quantize`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from llava_jax import cli, program
from llava_jax.errors import InputError
from llava_jax.inference.load import ROLES, LoadedModel, Media
from llava_jax.inference.prompting import Turn, prepare_prompt, render_turns
from llava_jax.inference.stops import visible_text

EXIT_WORDS = ("exit", "quit")


class ChatSession:
    """A conversation with one model about its images (or none).

    images: the images (`LoadedModel.load_image`) and a video (`load_video`), in order,
    shown in the first turn; or none. sampling:
    keyword arguments of `LoadedModel.sampling`; `seed` grows by one each turn. chunk_size:
    tokens per streamed piece. history: the turns so far (`turns`: as LLaVA's).
    """

    def __init__(
        self,
        model: LoadedModel,
        images: Sequence[Media],
        *,
        chunk_size: int = 1,
        **sampling,
    ):
        self.model = model
        self.images = list(images)
        self.chunk_size = chunk_size
        self.sampling = sampling
        self.history: list[Turn] = []

    @property
    def turns(self) -> list[dict]:
        """The conversation so far as LLaVA's turns (`{"from", "value"}`)."""
        return render_turns(self.model, self.history)

    def ask(self, question: str, write: Callable[[str], None]) -> str:
        """Answer `question` with the history; pieces of the answer go to `write` as they
        come. The turn joins the history only when it completes.

        Raises `PromptTooLongError` (history unchanged) when the conversation no longer
        fits, and `InputError` (history unchanged) when the question is not valid Unicode
        or writes `<image>` where there is no image to put (any turn but the first, or a
        chat without an image).
        """
        model = self.model
        first = not self.history
        turns = [*self.history, Turn("user", question, len(self.images) if first else 0)]
        knobs = dict(self.sampling)
        max_new = knobs.pop("max_new_tokens", 512)
        knobs["seed"] = knobs.get("seed", 0) + len(self.history) // 2
        prepared = prepare_prompt(model, turns, self.images, max_new_tokens=max_new, sampling=knobs)
        sampling = prepared.sampling
        pixels = model.batch_images([prepared.images])
        stream = model.stream(
            [prepared.ids], sampling=sampling, chunk_size=self.chunk_size, **pixels
        )
        tokens: list[int] = []
        shown = ""
        for pieces in stream:
            tokens.extend(pieces[0].tolist())
            text = visible_text(model.decode(tokens), sampling.stop_strings)
            if text.startswith(shown) and len(text) > len(shown):
                write(text[len(shown) :])
                shown = text
        answer = stream.result.texts[0].strip()
        if answer.startswith(shown):
            write(answer[len(shown) :])
        self.history = [*turns, Turn("assistant", answer)]
        return answer


def chat_loop(session: ChatSession, read: Callable[[str], str], out=None) -> int:
    """Read questions with `read(prompt)` until exit; print the streamed answers."""
    out = out or sys.stdout
    user, assistant = ROLES

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    while True:
        try:
            question = read(f"{user}: ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        except UnicodeDecodeError as err:  # a stdin that does not let bytes through
            program.report_error(
                InputError(f"the line is not valid UTF-8 ({err.reason}); type it again")
            )
            continue
        question = question.strip()
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            return 0
        write(f"{assistant}: ")
        try:
            session.ask(question, write)
        except InputError as err:  # too long, not valid Unicode, a stray <image>
            write("\n")
            program.report_error(InputError(f"{err}; this turn is left out (type exit to leave)"))
            continue
        except KeyboardInterrupt:
            write(" [interrupted]\n")
            continue
        write("\n")


def read_line(prompt: str) -> str:
    """`input()`, with the prompt on stdout: on a terminal `input(prompt)` would write it to
    stderr (when the readline module is not loaded)."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    return input()


def main(argv: Sequence[str] | None = None, read: Callable[[str], str] = read_line) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--image",
        action="append",
        help="image file to talk about (omit: text only; repeat for several)",
    )
    cli.add_video_arguments(parser)
    cli.add_sampling_arguments(parser, max_new_tokens=512, temperature=0.2)
    parser.add_argument("--chunk-size", type=int, default=1, help="tokens per streamed piece")
    args = parser.parse_args(argv)
    cli.check_sampling_arguments(parser, args)
    cli.check_video_arguments(parser, args)
    if args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")

    def body() -> int:
        for path in args.image or ():
            cli.check_image_file(path)
        if args.video is not None:
            cli.check_video_path(args.video)
        model = cli.model_from_args(args)
        if read is read_line and hasattr(sys.stdin, "reconfigure"):
            # Bytes that are not UTF-8 reach the session (as lone surrogates), which refuses
            # that one line, instead of an exception that ends the chat.
            sys.stdin.reconfigure(errors="surrogateescape")
        images: list[Media] = [model.load_image(path) for path in args.image or ()]
        if args.video is not None:
            images.append(model.load_video(args.video, args.frames))
        session = ChatSession(
            model, images, chunk_size=args.chunk_size, **cli.sampling_from_args(args)
        )
        print(
            f"Chatting with {args.checkpoint} (template {model.template.name}). "
            "Type exit or quit, or press Ctrl-D, to leave.",
            file=sys.stderr,
            flush=True,
        )
        return chat_loop(session, read)

    return program.run(body, args)


if __name__ == "__main__":
    sys.exit(main())
