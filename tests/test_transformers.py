"""transformers' models (the optional extra, which `make test` installs): whole models through the
tracker against brute force, the layer types registered by import path, and the hf-gpt2 and hf-llama
recipe kinds.
The GPT-2 and Llama-norm cases of tests/cases.py run through every kernel and method test as well."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from bruteforce import reference_values
from cases import _tokens, sequence_cross_entropy
from conftest import rel_err
from helpers import cli, write_recipe

from adamshap_core import InRunShapley
from adamshap_core.engine import kernel_for
from adamshap_core.engine.transformers_rms_norm import TransformersRMSNormKernel
from adamshap_core.errors import UserError
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.runio import RunFolder

transformers = pytest.importorskip("transformers")

METHODS = ("adam", "adam_fixed", "sgd")


class Logits(torch.nn.Module):
    """A causal LM of transformers as the README's loop wraps it: ids → logits, positions per row."""

    def __init__(self, lm: torch.nn.Module, positions: bool = True):
        super().__init__()
        self.lm, self.positions = lm, positions

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).expand_as(ids) if self.positions else None
        return self.lm(input_ids=ids, position_ids=positions).logits


def tiny(family: str) -> torch.nn.Module:
    """A one-block causal LM of ``family`` (vocabulary 11, width 8), freshly initialised."""
    sizes = dict(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    config, model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
        "granite": ("GraniteConfig", "GraniteForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    }[family]
    if family in ("qwen3", "gemma"):
        sizes["head_dim"] = 4
    if not hasattr(transformers, model):  # families newer than the transformers installed
        pytest.skip(f"transformers {transformers.__version__} has no {model}")
    return getattr(transformers, model)(getattr(transformers, config)(**sizes))


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("per_target", [False, True], ids=["mean-target", "per-target"])
def test_a_whole_llama_is_valued_as_brute_force_and_trains_as_plain(fuse, per_target, float64):
    """Every method on a Llama (Linear, Embedding, its RMSNorm, rotary positions), AdamW with clipping,
    batch 5, 3 validation rows. Its norm computes in float32 also in float64, so the layers before it
    carry float32 rounding (in both the brute force and the batch): 1e-5, not float64's tolerance
    (measured 1.7e-7 here; up to 3e-6 over seeds 0 to 3)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Logits(tiny("llama"))
    plain = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    data = _tokens()
    vx, vy = data(3, gen)
    tracker = InRunShapley(
        model, opt, sequence_cross_entropy, vx, vy, METHODS,
        max_grad_norm=0.5, per_target=per_target, fuse_validation=fuse,
    )  # fmt: skip
    for _ in range(3):
        x, y = data(5, gen)
        want = reference_values(
            model, opt, sequence_cross_entropy, x, y, vx, vy, max_grad_norm=0.5, per_target=per_target
        )
        got = tracker.step(x, y)
        for m in METHODS:
            g = got.values[m] if per_target else got.values[m].unsqueeze(1)
            assert rel_err(g, want[m]) <= 1e-5, m
        plain_opt.zero_grad()
        sequence_cross_entropy(plain(x), y).mean().backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        plain_opt.step()
    assert tracker.fusion_blocked is None if fuse else tracker.fusion_blocked
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p - q).abs().max() <= (1e-10 if fuse else 0.0), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_the_norm_kernel_rounds_as_the_forward_of_a_half_precision_model(dtype):
    """The engine hands a kernel its input in float32; the forward scales x̂ rounded to the model's
    dtype, and so must the kernel's per-row gradients (b ⊙ x̂, summed over positions)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)  # weight 1: its output is the rounded x̂ itself
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    b = torch.randn(3, 5, 64, generator=gen)
    with torch.no_grad():
        want = (b.double() * norm(x).double()).sum(1)
    got = TransformersRMSNormKernel().gradients(norm, x.float(), b, ("weight",), summed=False)["weight"]
    assert rel_err(got.double(), want) <= 1e-6


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "granite"])
def test_the_llama_familys_norms_have_the_kernel_and_pass_the_start_up_check(family):
    """Registered by import path: each family's own RMSNorm class (transformers copies it per model)
    gets the kernel, and the start-up check (the kernels' gradients against autograd's) passes."""
    model = Logits(tiny(family))
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(isinstance(kernel_for(m), TransformersRMSNormKernel) for m in norms)
    gen = torch.Generator().manual_seed(0)
    vx, vy = _tokens()(3, gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = InRunShapley(model, opt, sequence_cross_entropy, vx, vy, ("adam",))
    x, y = _tokens()(4, gen)
    assert tracker.step(x, y).values["adam"].shape == (4,)


def test_a_norm_of_another_rule_is_refused_naming_it():
    """Gemma's RMSNorm scales by 1 + w: no kernel is registered for it, and the tracker says which."""
    model = Logits(tiny("gemma"))
    vx, vy = _tokens()(3, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"module 'lm\.model\.layers\.0\.input_layernorm' \(GemmaRMSNorm\)"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), sequence_cross_entropy, vx, vy, ("adam",))


def test_gpt2s_shared_row_of_positions_is_refused_naming_the_layer():
    """GPT-2's default positions are one row for the whole batch: the error names the layer and the fix."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=None,
                        eos_token_id=None)  # fmt: skip
    model = Logits(GPT2LMHeadModel(config), positions=False)
    vx, vy = _tokens()(3, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"layer 'lm\.transformer\.wpe' \(Embedding\).*position_ids=torch"):
        InRunShapley(model, torch.optim.Adam(model.parameters()), sequence_cross_entropy, vx, vy, ("adam",))


def test_valuing_a_model_without_transformers_layers_does_not_import_it():
    code = (
        "import sys, torch, torch._dynamo\n"
        "if 'transformers' in sys.modules: sys.exit(3)\n"  # torch 2.3's own torch.onnx imports it
        "from adamshap_core import InRunShapley\n"
        "from adamshap_core.recipe import load_recipe\n"
        "m = torch.nn.Linear(3, 2)\n"
        "x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])\n"
        "loss = lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction='none')\n"
        "InRunShapley(m, torch.optim.Adam(m.parameters()), loss, x, y).step(x, y)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode == 3:
        pytest.skip("this torch imports transformers itself")
    assert res.returncode == 0, res.stderr


HF_RECIPE = {
    "name": "hf",
    "data": {"source": "builtin:facts", "facts": {"n_facts": 12}},
    "model": {"kind": "hf-gpt2", "n_layer": 1, "n_head": 2, "d_model": 8},
    "optim": {"name": "adamw", "lr": 1e-2},
    "train": {"epochs": 2, "batch_size": 4, "device": "cpu"},
}


def hf_recipe(kind: str = "hf-gpt2") -> dict:
    return {**HF_RECIPE, "model": {**HF_RECIPE["model"], "kind": kind}}


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-llama"])
def test_the_hf_recipes_train_and_attribute(tmp_path, kind):
    recipe = write_recipe(tmp_path, hf_recipe(kind))
    runs = tmp_path / "runs"
    res = cli("train", recipe, "--quiet", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    res = cli("attribute", "--run", "hf", "--runs-dir", runs, "--quiet")
    assert res.exit_code == 0, res.output
    assert (runs / "hf" / "attribution_queries.parquet").exists()


def test_a_llama_head_of_odd_width_is_refused_naming_the_fields(tmp_path):
    """Rotary positions turn pairs of dimensions: an odd head width is a recipe error, not a traceback."""
    recipe = {**HF_RECIPE, "model": {"kind": "hf-llama", "n_layer": 1, "n_head": 2, "d_model": 10}}
    res = cli("train", write_recipe(tmp_path, recipe), "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2
    assert "`model.d_model` / `model.n_head` (10 / 2) must be even for hf-llama" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_a_transformers_that_does_not_import_is_refused_with_the_install_command(tmp_path):
    """Installed but broken (built for another torch, say): one error line, exit 2, nothing written."""
    broken = tmp_path / "site" / "transformers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('needs torch>=99')\n")
    recipe = write_recipe(tmp_path, HF_RECIPE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken.parent), *sys.path])}
    res = subprocess.run(
        [sys.executable, "-m", "adamshap_cli", "train", str(recipe), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "installed but does not import (needs torch>=99)" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "hf").exists()


@pytest.mark.parametrize("kind", ["hf-gpt2", "hf-llama"])
def test_an_hf_recipe_without_transformers_is_refused_with_the_install_command(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: find_spec gives None
    recipe = write_recipe(tmp_path, hf_recipe(kind))
    res = cli("train", recipe, "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2
    assert f"`model.kind` {kind} needs the transformers package" in res.output
    assert "pip install 'adamshap[hf]'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs" / "hf").exists()


def test_a_saved_hf_run_without_transformers_is_refused_naming_the_run(tmp_path, monkeypatch):
    """compare, prune and attribute read the run's saved recipe: the error says whose file it is."""
    folder = RunFolder(tmp_path / "runs" / "hf")
    folder.path.mkdir(parents=True)
    folder.write_recipe(recipe_from_dict(hf_recipe()))
    monkeypatch.setitem(sys.modules, "transformers", None)
    named = r"invalid recipe of run 'hf' \(.*recipe.yaml\): `model`: `model.kind` hf-gpt2 needs"
    with pytest.raises(UserError, match=named):
        folder.recipe()
