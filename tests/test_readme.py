"""The README's Python examples run as written, so that a newcomer's first copy and paste works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block_with(text: str) -> str:
    (block,) = [b for b in BLOCKS if text in b]
    return block


def test_the_library_example_runs_and_values_each_example_of_its_batch():
    names: dict = {}
    exec(block_with("a training batch, B = 8"), names)
    result = names["result"]
    assert isinstance(result.loss, float) and set(result.values) == {"adam", "sgd"}
    assert result.values["adam"].shape == (len(names["targets"]),)


def test_the_transformers_wrapper_and_loss_value_a_gpt2():
    transformers = pytest.importorskip("transformers")
    from adamshap_core import InRunShapley

    names: dict = {}
    exec(block_with("class Logits"), names)
    config = transformers.GPT2Config(
        vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, attn_implementation="eager"
    )
    model = names["Logits"](transformers.GPT2LMHeadModel(config))
    optimizer = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(0)
    val_ids, ids = torch.randint(0, 20, (2, 6), generator=gen), torch.randint(0, 20, (3, 6), generator=gen)
    tracker = InRunShapley(model, optimizer, names["next_token_loss"], val_ids, val_ids)
    assert tracker.step(ids, ids).values["adam"].shape == (3,)


def test_the_recipe_keys_listed_with_their_defaults_are_the_schemas():
    import yaml

    from adamshap_core.recipe import recipe_from_dict

    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "checkpoint_every:" in b]
    listed = yaml.safe_load(block)
    required = {"name": listed["name"], "data": {"source": listed["data"]["source"]}}
    assert listed == recipe_from_dict(required).to_dict()
