"""Install llava_jax: `pip install -e ".[test]"`."""

from setuptools import find_packages, setup

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA (CLIP ViT + projector + LLaMA) in JAX/Flax: train, convert, serve.",
    python_requires=">=3.10",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    # The chat page of `python -m llava_jax.serve` (plain HTML and JavaScript), and the
    # LLaVA-Bench judge's rule file (its prompts, one per question category).
    package_data={
        "llava_jax.serve": ["static/*"],
        "llava_jax.evaluation": ["rule.json"],
        "llava_jax.data": ["instruct_prompts/*/*.txt"],
    },
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.20",
        # Vicuna and LLaMA ship a SentencePiece model (no tokenizer.json): transformers
        # converts it to a fast tokenizer with this.
        "sentencepiece>=0.2",
        "tensorflow-datasets>=4.9.8",
        "array_record>=0.6",
        "ml_collections>=1.0",
        "grain>=0.2.10",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "pillow>=10.0",
        # PyAV (FFmpeg): decoding video files to frames (llava_jax/data/video.py).
        "av>=12",
        "safetensors>=0.4.3",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # libtpu (~700 MB): compiling for TPU slices, ahead of time, without a TPU
        # (python -m llava_jax.plan); also what a TPU VM runs on.
        "tpu": ["jax[tpu]"],
        # python -m llava_jax.serve: the OpenAI-compatible HTTP server.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # torch only runs the transformers reference in tests; the CPU build is pinned
        # because an unpinned torch pulls a multi-GB CUDA build. The tests plan a TPU slice.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "torch==2.13.0",
            "ruff>=0.6",
            "jax[tpu]",
            # The server's tests: the official client, and the chat page in a headless
            # Chromium (the browser itself comes from apt: see the README's test command).
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "openai>=1.40",
            "selenium>=4.20",
            # /metrics read back with Prometheus' own text parser.
            "prometheus-client>=0.20",
            # LoRA adapters exchanged with the real PEFT package (tests/test_lora.py).
            "peft>=0.13",
        ],
    },
)
