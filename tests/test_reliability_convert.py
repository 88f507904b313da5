"""Reliability of `python -m llava_jax.convert` on PEFT adapters and damaged files: an
adapter becomes exactly the model `peft.PeftModel.from_pretrained` makes of it, or is
refused in one `error: …` line (exit status 2) naming the setting, file or tensor and what
to change, with `--out` untouched.

One tiny transformers LLaVA and one adapter PEFT itself made on all its linear layers
(vision tower, projector, decoder) serve every test; each test rewrites a copy of that
adapter's config or tensors into the bad input it is about.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import jax
import numpy as np
import peft
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from hf_reference import make_inputs, reference_logits, tiny_hf_config, tiny_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import LlavaForConditionalGeneration

from llava_jax.checkpoint import save_params
from llava_jax.convert import __main__ as convert_main
from llava_jax.convert import load_hf
from llava_jax.convert.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    import_peft_adapter,
    linear_modules,
)
from llava_jax.convert.safetensors_io import CheckpointError
from llava_jax.models.llava import Llava

PREFIX = "base_model.model."
RANK, ALPHA = 4, 8


def _module(key: str) -> str:
    """The module a PEFT tensor name adapts."""
    return key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(root, transformers model, config, params): the tiny LLaVA saved as a transformers
    folder (`hf`) and a params checkpoint (`base`), and PEFT's own adapter on every linear
    layer but the LM head (`full`, random non-zero factors)."""
    root = tmp_path_factory.mktemp("convert_reliability")
    model = tiny_hf_model(tiny_hf_config())
    model.save_pretrained(root / "hf")
    config, params = load_hf(str(root / "hf"))
    save_params(str(root / "base"), config, params)
    hf = LlavaForConditionalGeneration.from_pretrained(str(root / "hf")).eval()
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")
    peft_model = peft.get_peft_model(hf, lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn_like(param))
    peft_model.save_pretrained(str(root / "full"))
    return root, model, config, params


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="numpy") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def _not_vision(module: str) -> bool:
    return ".vision_tower." not in f".{module}"


def _variant(root: Path, name: str, settings: dict | None = None, keep=_not_vision) -> Path:
    """A copy of the full adapter at `root/name`: `settings` written over its config, and
    only the tensors of modules `keep(module)` accepts (default: the decoder's and the
    projector's, whose names every transformers version shares)."""
    folder = root / name
    folder.mkdir()
    adapter_config = json.loads((root / "full" / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**adapter_config, **(settings or {})}))
    tensors = {k: v for k, v in _tensors(root / "full").items() if keep(_module(k))}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def _peft_load(root: Path, folder: Path):
    """PEFT's model of the adapter `folder` on the base (eval), and the modules it adapted."""
    hf = LlavaForConditionalGeneration.from_pretrained(str(root / "hf")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing or unexpected adapter keys: what we test
        peft_model = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
    suffix = ".lora_A.default"
    adapted = {
        n.removeprefix(PREFIX).removesuffix(suffix)
        for n, _ in peft_model.named_modules()
        if n.endswith(suffix)
    }
    return peft_model, adapted


def _ours_adapted(lora_config) -> set[str]:
    """The transformers modules our imported model adapts."""
    return {
        linear.module
        for linear in linear_modules(lora_config)
        if lora_config.lora.adapts("/".join(linear.node))
    }


def _convert(capsys, *args) -> tuple[int, str]:
    """`python -m llava_jax.convert ARGS` in process: (exit status, the one error line)."""
    capsys.readouterr()  # (what ran before, e.g. transformers' progress bars)
    code = convert_main.main([str(arg) for arg in args])
    err = capsys.readouterr().err
    if code == 0:
        return code, err
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return code, lines[0]


def _earlier_out(root: Path, name: str) -> Path:
    """An `--out` folder holding an earlier export, to give with --overwrite."""
    out = root / name
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier export")
    return out


def _untouched(out: Path) -> None:
    """`out` holds what `_earlier_out` put there, and nothing was left beside it."""
    assert sorted(os.listdir(out)) == ["earlier.txt"]
    assert (out / "earlier.txt").read_text() == "an earlier export"
    assert not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]


def _refused_import(capsys, root: Path, adapter: Path, out: Path) -> str:
    """`peft-to-params` of `adapter` onto the base, `--out` an earlier export given with
    --overwrite: refused in one line (exit 2), `out` untouched; returns the line."""
    code, line = _convert(
        capsys, "peft-to-params", "--params", root / "base", "--adapter", adapter,
        "--out", out, "--overwrite",
    )  # fmt: skip
    assert code == 2, line
    _untouched(out)
    return line


# --- which modules: exactly PEFT's ------------------------------------------------------------

# (case: adapter_config.json settings; the file holds factors for every linear layer but the
# vision tower's, or, for "exclude", every one)
SELECTIONS = {
    # a list: a module named by an entry or ending in "." + entry (vision and decoder q_proj)
    "list": {"target_modules": ["q_proj"]},
    # a string: a regex fullmatched against the module name
    "regex": {"target_modules": r".*language_model.*\.(q_proj|down_proj)"},
    # exclude_modules (a regex) takes the vision tower's out of the list's selection
    "exclude": {"target_modules": ["v_proj", "fc1", "linear_1"], "exclude_modules": ".*vision.*"},
    # layers_to_transform keeps only numbered layers: never the projector's linear_1
    "layers": {"target_modules": ["linear_1", "gate_proj"], "layers_to_transform": [0, 1]},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(SELECTIONS))
def test_peft_to_params_adapts_exactly_the_modules_peft_loads(base, case):
    """An adapter whose file holds factors its config does not select (PEFT would not load
    them) is refused naming such a tensor; holding only what PEFT loads, it imports as the
    same model as PEFT's: the same adapted modules, and (for two cases) the same logits."""
    root, model, config, params = base
    everything = (lambda module: True) if case == "exclude" else _not_vision
    folder = _variant(root, f"{case}_all", SELECTIONS[case], keep=everything)
    _, peft_adapted = _peft_load(root, folder)
    in_file = {_module(k) for k in _tensors(folder)}
    assert peft_adapted & in_file and in_file - peft_adapted  # factors PEFT leaves out
    with pytest.raises(CheckpointError, match="does not select") as refused:
        import_peft_adapter(config, params, str(folder))
    message = str(refused.value)
    named = next(k for k in _tensors(folder) if repr(k) in message)
    assert _module(named) not in peft_adapted, message
    assert "PEFT would not load it" in message and ADAPTER_CONFIG in message

    # the file holds what PEFT loads (but for the vision tower's q_proj in "list": PEFT
    # adapts them with lora_B at zero, the base, and ours are not adapted at all)
    wanted = peft_adapted & in_file
    if case == "list":
        assert wanted < peft_adapted
    folder = _variant(root, f"{case}_loaded", SELECTIONS[case], keep=wanted.__contains__)
    lora_config, lora_params = import_peft_adapter(config, params, str(folder))
    assert _ours_adapted(lora_config) == wanted
    if case in ("list", "layers"):
        peft_model, again = _peft_load(root, folder)
        assert again == peft_adapted
        inputs = make_inputs(model.config, [1, 1], length=22, real_lengths=[22, 18])
        theirs = reference_logits(peft_model, inputs)
        ours = np.asarray(Llava(lora_config).apply({"params": lora_params}, **inputs))
        valid = inputs["attention_mask"].astype(bool)
        assert np.abs(ours - theirs)[valid].max() <= 1e-4
        assert np.abs(reference_logits(model, inputs) - theirs)[valid].max() > 1e-2


@pytest.mark.timeout(120)
def test_peft_to_params_refuses_factors_peft_would_not_load_in_one_line(base, capsys):
    """The issue's case on the command line: target_modules ["q_proj"], factors for every
    linear layer in the file (it used to convert all of them, exit 0)."""
    root, _, _, _ = base
    folder = _variant(root, "cli_q_proj", {"target_modules": ["q_proj"]})
    out = _earlier_out(root, "cli_q_proj_out")
    line = _refused_import(capsys, root, folder, out)
    # (the first tensor in name order that PEFT would not load)
    assert "'base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight'" in line
    assert "does not select" in line and "PEFT would not load it" in line, line
    assert 'target_modules=["q_proj"]' in line, line


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("settings", "named", "peft_error"),
    [
        # a regex that matches no module: PEFT's NoMatchingPeftModuleError
        (
            {"target_modules": r".*text_model.*\.q_proj"},
            r'target_modules=".*text_model.*\\.q_proj" selects none',
            "NoMatching",
        ),
        # every selected module excluded: the same error in PEFT
        (
            {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
            'exclude_modules=["q_proj"] selects none',
            "NoMatching",
        ),
        # a module that holds others (LlamaMLP, CLIPMLP): PEFT cannot adapt it
        (
            {"target_modules": ["mlp"]},
            "selects model.language_model.layers.0.mlp,",
            "not supported",
        ),
    ],
    ids=["regex_matching_nothing", "all_excluded", "not_a_linear_layer"],
)
def test_a_selection_peft_refuses_is_refused_naming_it(
    base, capsys, request, settings, named, peft_error
):
    root, _, _, _ = base
    name = request.node.callspec.id
    folder = _variant(root, name, settings)
    with pytest.raises(Exception) as theirs:  # PEFT refuses it too
        _peft_load(root, folder)
    assert peft_error in f"{type(theirs.value).__name__}: {theirs.value}"
    out = _earlier_out(root, name + "_out")
    line = _refused_import(capsys, root, folder, out)
    assert named in line and str(folder / ADAPTER_CONFIG) in line, line
    assert "selects" in line and "PEFT refuses" in line, line


# --- numbers: r, lora_alpha and the factors --------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"lora_alpha": math.nan}, "lora_alpha=nan is not a finite number"),
        ({"lora_alpha": math.inf}, "lora_alpha=inf is not a finite number"),
        ({"lora_alpha": -math.inf}, "lora_alpha=-inf is not a finite number"),
        ({"r": RANK + 0.5}, "r=4.5 is not a positive integer"),
        ({"r": 0}, "r=0 is not a positive integer"),
    ],
    ids=["alpha_nan", "alpha_inf", "alpha_minus_inf", "r_fraction", "r_zero"],
)
def test_peft_to_params_refuses_a_scale_peft_cannot_use(base, capsys, settings, named):
    """JSON's NaN and Infinity read as numbers: such an alpha used to be written into the
    checkpoint (and merge-lora then made every adapted kernel NaN), and r=4.5 read as 4."""
    root, _, _, _ = base
    name = next(iter(settings)) + "_" + str(settings[next(iter(settings))]).replace(".", "_")
    folder = _variant(root, name, settings)
    out = _earlier_out(root, name + "_out")
    line = _refused_import(capsys, root, folder, out)
    assert named in line and str(folder / ADAPTER_CONFIG) in line, line


@pytest.mark.timeout(120)
def test_peft_to_params_refuses_nan_factors_naming_the_tensor(base, capsys):
    root, _, _, _ = base
    folder = _variant(root, "nan_factor")
    tensors = _tensors(folder)
    key = f"{PREFIX}model.language_model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 1] = np.nan
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    out = _earlier_out(root, "nan_factor_out")
    line = _refused_import(capsys, root, folder, out)
    assert repr(key) in line and str(folder / ADAPTER_WEIGHTS) in line, line
    assert "1 NaN or infinite value" in line, line


@pytest.mark.timeout(180)
def test_merge_lora_refuses_a_checkpoint_with_a_non_finite_scale_or_factor(base, capsys):
    """A LoRA checkpoint with lora.alpha NaN (as peft-to-params used to write) or a NaN
    factor: merge-lora, params-to-hf --merge-lora and lora-to-peft refuse it, naming the
    setting or the factor, instead of writing NaN weights."""
    root, _, config, params = base

    def keep(module: str) -> bool:
        return "language_model" in module and module.endswith(("q_proj", "down_proj"))

    folder = _variant(root, "for_merge", {"target_modules": ["q_proj", "down_proj"]}, keep)
    lora_config, lora_params = import_peft_adapter(config, params, str(folder))
    save_params(str(root / "nan_alpha"), lora_config, lora_params)
    # what peft-to-params used to write (LoraConfig itself now refuses a NaN alpha)
    config_file = root / "nan_alpha" / "model_config.json"
    written = json.loads(config_file.read_text())
    written["lora"]["alpha"] = math.nan
    config_file.write_text(json.dumps(written))
    flat = flatten_dict(jax.tree.map(np.array, lora_params))
    factor = ("llm", "layers", "attn", "query", "lora_a")
    assert factor in flat
    flat[factor][0, 1, 2] = np.inf
    save_params(str(root / "nan_factor_ckpt"), lora_config, unflatten_dict(flat))
    runs = [
        ("nan_alpha", "merge-lora", "lora.alpha=nan"),
        ("nan_alpha", "params-to-hf", "lora.alpha=nan"),
        ("nan_alpha", "lora-to-peft", "lora.alpha=nan"),
        ("nan_factor_ckpt", "merge-lora", "llm/layers/attn/query/lora_a holds 1 NaN"),
    ]
    for checkpoint, command, named in runs:
        out = _earlier_out(root, f"{checkpoint}_{command}")
        extra = ["--merge-lora"] if command == "params-to-hf" else []
        code, line = _convert(
            capsys, command, "--params", root / checkpoint, "--out", out, "--overwrite", *extra
        )
        assert code == 2, (command, line)
        assert named in line and str(root / checkpoint) in line, line
        _untouched(out)


# --- settings that make PEFT build another model -------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "settings",
    [
        {"init_lora_weights": "pissa"},  # PEFT rewrites the base weights on loading
        {"alora_invocation_tokens": [5, 6]},  # adapters only after those tokens
        {"layer_replication": [[0, 1], [0, 2]]},  # another layer stack
        {"trainable_token_indices": [3]},  # new embedding rows
        {"target_parameters": ["mlp.experts.gate_up_proj"]},  # LoRA on bare parameters
    ],
    ids=lambda settings: next(iter(settings)),
)
def test_settings_that_make_peft_build_another_model_are_refused(base, settings):
    root, _, config, params = base
    key = next(iter(settings))
    folder = _variant(root, f"setting_{key}", settings)
    with pytest.raises(CheckpointError, match=re.escape(f"{ADAPTER_CONFIG}: {key}=")):
        import_peft_adapter(config, params, str(folder))


@pytest.mark.timeout(60)
def test_with_random_init_a_selected_module_without_factors_is_refused(base):
    """init_lora_weights=false: PEFT gives a selected module the file holds no factors for
    random factors (lora_B too), so the adapter is not the file's alone."""
    root, _, config, params = base
    folder = _variant(
        root,
        "init_false",
        {"target_modules": ["q_proj"], "init_lora_weights": False},
        keep=lambda module: "language_model" in module and module.endswith("q_proj"),
    )
    with pytest.raises(CheckpointError, match="vision_tower.encoder.layers.0.self_attn.q_proj"):
        import_peft_adapter(config, params, str(folder))


# --- messages that say what to change -------------------------------------------------------


@pytest.mark.timeout(120)
def test_an_adapter_for_another_base_model_is_refused_saying_so(base, capsys, tmp_path):
    """An adapter made on a wider decoder (another model size): the module, both shapes, and
    that the adapter was made for another base model, whose name it gives; a config whose r
    is not the file's rank is told apart."""
    root, _, _, _ = base
    wider = tiny_hf_model(tiny_hf_config(text={"hidden_size": 60, "num_attention_heads": 6}))
    wider_peft = peft.get_peft_model(
        wider,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=r".*language_model.*\.q_proj"),
    )
    wider_peft.peft_config["default"].base_model_name_or_path = "example/llava-wider"
    wider_peft.save_pretrained(str(tmp_path / "wider"))
    out = _earlier_out(root, "wider_out")
    line = _refused_import(capsys, root, tmp_path / "wider", out)
    assert "model.language_model.layers.0.self_attn.q_proj" in line, line
    assert "(4, 60)" in line and "(4, 48)" in line, line
    assert "made for another base model (example/llava-wider)" in line, line

    folder = _variant(root, "other_rank", {"r": 2 * RANK})
    line = _refused_import(capsys, root, folder, out)
    assert f"rank {RANK}" in line and f"says r={2 * RANK}" in line and "disagree" in line, line


@pytest.mark.timeout(120)
def test_a_truncated_safetensors_file_is_named_with_what_to_do(base, capsys):
    """An adapter's or a transformers folder's safetensors file cut short (a broken download
    or copy): the file, that it is truncated or damaged, and to download or export it again."""
    root, _, _, _ = base
    folder = _variant(root, "truncated")
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    out = _earlier_out(root, "truncated_out")
    line = _refused_import(capsys, root, folder, out)
    assert str(weights) in line and "truncated or damaged" in line, line
    assert "download it again, or export it again" in line, line

    hf = root / "hf_truncated"
    hf.mkdir()
    for name in os.listdir(root / "hf"):
        data = (root / "hf" / name).read_bytes()
        (hf / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    assert (hf / "model.safetensors").exists()
    code, line = _convert(capsys, "hf-to-params", "--hf", hf, "--out", out, "--overwrite")
    assert code == 2, line
    assert str(hf / "model.safetensors") in line and "truncated or damaged" in line, line
    _untouched(out)
