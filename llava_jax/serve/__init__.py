"""An OpenAI-compatible HTTP server for a LLaVA checkpoint, with a chat page.

    python -m llava_jax.serve --checkpoint WORKDIR_OR_MODEL_DIR [--host 127.0.0.1]
        [--port 8000] [--max-batch 8] [--batch-wait-ms 10]

`app.py`: the routes (`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, the
chat page at `/`), a request's images and prompt, streaming; `requests.py`: reading and
checking a request; `api_error.py`: OpenAI's error shape; `batcher.py`: one worker thread
that decodes the requests that arrive together as one batch; `static/`: the page.
"""
