"""Tiny recipes and a CLI runner for the recipe/data/train/CLI tests (seconds, not minutes)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

# Tiny models run fastest on one thread, and pytest -n 2 already fills both cores.
torch.set_num_threads(1)

TINY = {
    "name": "tiny",
    "data": {"source": "sklearn:iris", "val_size": 20, "test_size": 30, "label_noise": 0.2, "seed": 0},
    "model": {"kind": "mlp", "hidden": [8]},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu"},
    "attribution": {"methods": ["adam", "adam_fixed", "sgd"], "record_steps": 3},
}


# a GPT on a few built-in facts, for what only a language model shows (dropout, token sequences)
TINY_GPT = {
    "name": "tiny-gpt",
    "data": {"source": "builtin:facts", "facts": {"n_facts": 6, "seed": 0}},
    "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 8},
    "optim": {"name": "adamw", "lr": 1.0e-2},
    "train": {"epochs": 1, "batch_size": 4, "seed": 0, "device": "cpu"},
    "attribution": {"methods": ["adam"], "record_steps": 0},
}


def tiny(**sections) -> dict:
    """TINY with sections updated: tiny(optim={"lr": 0.1}) merges into TINY["optim"]."""
    return merged(TINY, sections)


def tiny_gpt(**sections) -> dict:
    """TINY_GPT with sections updated, as ``tiny``."""
    return merged(TINY_GPT, sections)


def facts_gpt(**sections) -> dict:
    """TINY_GPT on 10 facts (seed 2), valued by adam and sgd, with sections updated as ``tiny``: the
    language-model run the compare and replay tests share."""
    base = {
        "data": {"facts": {"n_facts": 10, "seed": 2}},
        "optim": {"weight_decay": 0.01},
        "train": {"seed": 5},
        "attribution": {"methods": ["adam", "sgd"]},
    }
    return merged(tiny_gpt(**base), sections)


def merged(base: dict, sections: dict) -> dict:
    """``base`` with sections updated; a model section of another kind replaces the base's (whose
    fields, such as an mlp's ``hidden``, would not apply to it)."""
    r = copy.deepcopy(base)
    for k, v in sections.items():
        other_kind = k == "model" and isinstance(v, dict) and v.get("kind", r[k]["kind"]) != r[k]["kind"]
        if isinstance(v, dict) and isinstance(r.get(k), dict) and not other_kind:
            r[k].update(v)
        else:
            r[k] = v
    return r


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    p = Path(folder) / name
    p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return p


def cli(*args: str):
    from adamshap_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def threads_of_runs(monkeypatch) -> list[int]:
    """The intra-op thread count each later ``train.run`` call starts with, in order (a list that the
    calls fill), as a replay sets it."""
    from adamshap_core import train

    seen: list[int] = []
    real_run = train.run

    def counting_run(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(train, "run", counting_run)
    return seen
