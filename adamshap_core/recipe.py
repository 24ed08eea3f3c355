"""The recipe: one validated schema for everything a run needs.

A recipe is a YAML file (see ``recipes/``). ``load_recipe(path, overrides)``
reads it, applies ``--set key.path=value`` overrides, validates it and resolves
data paths; every problem becomes a ``UserError`` that names the field, what was
given and what was expected. ``Recipe.to_yaml()`` gives the resolved recipe,
which each run saves as ``recipe.yaml``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .choices import (
    HF_MODEL_KINDS,
    INSTALL_HINT,
    LANGUAGE_MODELS,
    METHOD_NAMES,
    MethodName,
    ModelKind,
    OptimizerName,
    transformers_missing,
)
from .data.registry import check_source, split_source, takes_path
from .errors import UserError, listed
from .fast import FastMode

# a run's name, which is also its folder's: no separators, no leading dot, and short enough for a
# file name (255 bytes) with the ``.<name>.old-<pid>`` that ``train --force`` moves it aside as
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
RUN_NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 200 characters"
# the range of the models' dtype, float32, which the learning rate and Adam's eps must lie in
FLOAT32_MAX, FLOAT32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def _number(v: Any) -> Any:
    """Accept ints, floats and numeric strings (PyYAML reads ``1e-3`` as a string)."""
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ValueError(f"expected a number, got the text {v!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("expected a finite number")
    return v


Num = Annotated[float, BeforeValidator(_number)]
Int = StrictInt
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]  # the range numpy and scikit-learn accept


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _size(v: Any, field: str) -> int | float:
    """A split size: an int count >= 1 or a float fraction in (0, 1)."""
    if isinstance(v, bool):
        raise ValueError(f"{field} must be a count (int >= 1) or a fraction in (0, 1), not a boolean")
    if isinstance(v, str):
        v = _number(v)
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"a count must be at least 1, got {v}")
        return v
    if isinstance(v, float):
        if v == 1.0:  # the whole set as a fraction, or one row as a count: neither is meant, likely
            raise ValueError("1.0 is neither a fraction in (0, 1) nor plainly a count; write 1 for one row")
        if v.is_integer() and v > 1:
            return int(v)
        if not 0.0 < v < 1.0:
            raise ValueError(f"a fraction must lie strictly between 0 and 1, got {v}")
        return v
    raise ValueError("expected a count (int >= 1) or a fraction in (0, 1)")


MAX_FACTS = 100_000


class FactsCfg(_Strict):
    """The generator of ``builtin:facts`` (see ``data/facts.py``)."""

    # training texts, one invented entity each; 100,000 take some 10 s to generate (and 400,000
    # queries), and a bound keeps a typo from generating for minutes before training starts
    n_facts: Int = Field(100, ge=2, le=MAX_FACTS)
    seed: Seed = 0  # the generator seed: same seed and size, same corpus and queries


class DataCfg(_Strict):
    source: str
    target: str | None = None  # the label column, for csv:/parquet: sources
    val_size: Any = 200
    test_size: Any = 300
    label_noise: Num = Field(0.0, ge=0.0, lt=1.0)
    seed: Seed = 0  # the split and label-noise seed
    facts: FactsCfg | None = None  # builtin:facts only (null there = the defaults)
    # text only: a longer text keeps its first max_words words (each batch is padded to the longest
    # text, so one long line sets the cost of every step)
    max_words: Int | None = Field(None, ge=1)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        check_source(v)
        return v.strip()  # (the checks after this one compare it with "builtin:facts")

    @field_validator("val_size", "test_size")
    @classmethod
    def _sizes(cls, v: Any, info) -> int | float:
        return _size(v, info.field_name)

    @model_validator(mode="after")
    def _target(self) -> DataCfg:
        scheme, _ = split_source(self.source)
        if scheme in ("csv", "parquet") and not self.target:
            raise ValueError(f"`data.target` (the label column) is required for a {scheme}: source")
        if scheme not in ("csv", "parquet") and self.target is not None:
            raise ValueError("`data.target` only applies to csv:/parquet: sources")
        if scheme in ("sklearn", "csv", "parquet") and self.max_words is not None:
            raise ValueError("`data.max_words` only applies to text (jsonl:, text:, builtin:) sources")
        return self

    @model_validator(mode="after")
    def _facts(self) -> DataCfg:
        if self.source != "builtin:facts":
            if self.facts is not None:
                raise ValueError("`data.facts` only applies to the builtin:facts source")
            return self
        # (compared with the defaults, not "was it given", so a saved recipe.yaml loads again)
        changed = [
            f for f in ("val_size", "test_size") if getattr(self, f) != type(self).model_fields[f].default
        ]
        if changed:
            raise ValueError(
                f"`data.{changed[0]}` does not apply to builtin:facts, whose validation split is its "
                "paraphrase queries and whose test split is its heavy queries; remove it"
            )
        if self.facts is None:
            self.facts = FactsCfg()
        return self


# the model kinds each model field shapes (``kind`` and the others apply to every kind)
MODEL_FIELD_KINDS = {
    "hidden": ("mlp", "cnn"),
    "channels": ("cnn",),
    **{
        name: LANGUAGE_MODELS
        for name in ("n_layer", "n_head", "d_model", "mlp_ratio", "block_size", "tie_weights", "dropout")
    },
}


def _set_for_another_choice(
    section: BaseModel, applies: dict[str, tuple[str, ...]], chosen: str
) -> str | None:
    """The first field of ``section`` that ``applies`` keeps for choices other than ``chosen`` (model
    kinds, optimizers) but that is set away from its default; None where there is none. (Compared
    with the defaults, not "was it given", so that a saved recipe.yaml, which lists every field,
    loads again.)"""
    for name, choices in applies.items():
        default = type(section).model_fields[name].get_default(call_default_factory=True)
        if chosen not in choices and getattr(section, name) != default:
            return name
    return None


def _refuse_another_choices(
    section: BaseModel, applies: dict[str, tuple[str, ...]], where: str, choice: str
) -> None:
    """A ValueError naming the first field of ``section`` set for choices other than its own (the value
    of its field ``choice``, such as model.kind) and the choices it applies to."""
    chosen = getattr(section, choice)
    name = _set_for_another_choice(section, applies, chosen)
    if name is not None:
        choices = listed(applies[name], "and")
        raise ValueError(
            f"`{where}.{name}` only applies to {choices} ({where}.{choice} is {chosen}); remove it"
        )


class ModelCfg(_Strict):
    kind: ModelKind = "mlp"
    hidden: list[Annotated[Int, Field(ge=1)]] = Field(default_factory=lambda: [128])
    channels: list[Annotated[Int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])  # cnn only
    # language models only (text sources): a nanoGPT-style decoder, or transformers' GPT-2 or Llama of
    # these sizes
    n_layer: Int = Field(2, ge=1)
    n_head: Int = Field(2, ge=1)
    d_model: Int = Field(64, ge=1)
    mlp_ratio: Int = Field(4, ge=1)  # MLP hidden width = mlp_ratio · d_model
    block_size: Annotated[Int, Field(ge=1)] | None = None  # context length; null = the longest text
    tie_weights: StrictBool = True  # LM head shares the token embedding
    dropout: Num = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _applies(self) -> ModelCfg:
        _refuse_another_choices(self, MODEL_FIELD_KINDS, "model", "kind")
        return self

    @model_validator(mode="after")
    def _heads(self) -> ModelCfg:
        if self.kind in LANGUAGE_MODELS and self.d_model % self.n_head:
            raise ValueError(
                f"`model.d_model` ({self.d_model}) must be a multiple of `model.n_head` ({self.n_head})"
            )
        if self.kind == "hf-llama" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"`model.d_model` / `model.n_head` ({self.d_model} / {self.n_head}) must be even for "
                "hf-llama, whose rotary positions turn pairs of each head's dimensions"
            )
        return self

    @model_validator(mode="after")
    def _installed(self) -> ModelCfg:
        if self.kind in HF_MODEL_KINDS and transformers_missing():
            raise ValueError(
                f"`model.kind` {self.kind} needs the transformers package, which is not installed: "
                + INSTALL_HINT
            )
        return self

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("a cnn needs at least one convolution: give at least one channel count")
        return v


Beta = Annotated[Num, Field(ge=0.0, lt=1.0)]
# the optimizers each optimizer field shapes (``name`` and the others apply to every optimizer)
OPTIM_FIELD_NAMES = {"momentum": ("sgd",), "betas": ("adam", "adamw"), "eps": ("adam", "adamw")}


class OptimCfg(_Strict):
    name: OptimizerName = "adam"
    lr: Num = Field(1e-3, gt=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Num = Field(1e-8, gt=0.0)
    weight_decay: Num = Field(0.0, ge=0.0)
    momentum: Num = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: Int = Field(0, ge=0)

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if v > FLOAT32_MAX:
            raise ValueError(
                f"expected at most {FLOAT32_MAX:.3g}, the largest float32 (the model trains in float32)"
            )
        return v

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: float) -> float:
        if v < FLOAT32_TINY:
            raise ValueError(
                f"expected at least {FLOAT32_TINY:.3g}, the smallest normal float32: a smaller one is "
                "rounded to 0 (or to a subnormal) in float32, where Adam divides by it"
            )
        return v

    @model_validator(mode="after")
    def _applies(self) -> OptimCfg:
        _refuse_another_choices(self, OPTIM_FIELD_NAMES, "optim", "name")
        return self

    @model_validator(mode="after")
    def _first_step(self) -> OptimCfg:
        if self.name != "sgd" and self.lr / (1.0 - self.betas[0]) > FLOAT32_MAX:
            raise ValueError(
                f"`optim.lr` {self.lr:g} over 1 − betas[0] ({1.0 - self.betas[0]:g}), Adam's first step "
                f"size, exceeds the largest float32 ({FLOAT32_MAX:.3g}); expected a smaller optim.lr"
            )
        return self


class TrainCfg(_Strict):
    epochs: Int = Field(5, ge=1)
    batch_size: Int = Field(32, ge=1)
    grad_clip: Annotated[Num, Field(gt=0.0)] | None = None
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: Int = Field(200, ge=0)  # steps between checkpoints; 0 = off
    # and at least this many seconds apart: a checkpoint holds every example's values, so on a large
    # training split steps alone would write gigabytes an epoch (0 = by steps alone)
    checkpoint_seconds: Annotated[Num, Field(ge=0.0)] = 60.0


class AttributionCfg(_Strict):
    enabled: StrictBool = True
    methods: list[MethodName] = Field(default_factory=lambda: list(METHOD_NAMES))
    val_batch: Annotated[Int, Field(ge=1)] | None = None  # null = the whole validation split
    record_steps: Int = Field(8, ge=0)  # steps whose per-step values are kept; 0 = off
    fast: FastMode | None = None  # null = exact values; true or a mapping = the fast mode
    # validation rows in the training batch (one forward/backward per step, see fused.py): the
    # update then equals plain training's up to float rounding, not bit for bit
    fuse_validation: StrictBool = False
    # the valuation math after the backward pass as compiled graphs (see compiled.py): seconds to compile
    # on the first step, less dispatch on every later one; computed eagerly, with a warning, where it fails
    compile: StrictBool = False

    @field_validator("fast", mode="before")
    @classmethod
    def _fast(cls, v: Any) -> Any:
        if v is True:
            return {}  # the fast mode with its defaults
        return None if v is False else v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"give at least one method out of {list(METHOD_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"each method may appear once, got {v}")
        return v


class Recipe(_Strict):
    name: str
    data: DataCfg
    model: ModelCfg = Field(default_factory=ModelCfg)
    optim: OptimCfg = Field(default_factory=OptimCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    attribution: AttributionCfg = Field(default_factory=AttributionCfg)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME.match(v):
            raise ValueError(f"expected a run name of {RUN_NAME_RULE}")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed_keys(loc: tuple) -> list[str]:
    section = _section_at(loc[:-1])
    return list(section.model_fields) if section is not None else []


def _field(parts: list[str]) -> Any:
    """The schema's field at ``parts`` (None for a path the schema lacks, which validation names)."""
    section = _section_at(parts[:-1])
    return section.model_fields.get(parts[-1]) if section is not None else None


def _section_at(path: Sequence) -> type[BaseModel] | None:
    """The recipe's section at ``path`` (``()``: the recipe itself; None where there is none)."""
    section: type[BaseModel] | None = Recipe
    for part in path:
        field = section.model_fields.get(str(part)) if section is not None else None
        section = _section_model(getattr(field, "annotation", None))
    return section


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds: its annotation, or the one in ``Section | None`` (``data.facts``,
    ``attribution.fast``); None for a field that is no section."""
    for ann in (annotation, *get_args(annotation)):
        # get_origin: Python 3.10 takes list[int] for a type, which issubclass then refuses
        if isinstance(ann, type) and get_origin(ann) is None and issubclass(ann, BaseModel):
            return ann
    return None


def format_validation_error(err: ValidationError, origin: str, overrides: Sequence[str] = ()) -> str:
    """One paragraph: each problem with its field path, what was given and what was expected, and
    the ``--set`` behind it where one set that field or its section."""
    problems = []
    for e in err.errors():
        loc = tuple(
            p for p in e["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "tuple["))
        )
        problem = _describe_problem(e, loc)
        problems.append(problem + _override_behind(loc, overrides, problem))
    return f"invalid recipe {origin}: " + "; ".join(problems) + "."


def _override_behind(loc: tuple, overrides: Sequence[str], problem: str) -> str:
    """Names the overrides that set this field or its section, or a field inside it that the
    ``problem`` names (a check across a section's keys names the ones it is about), if any."""
    path = [str(p) for p in loc]

    def behind(key: list[str]) -> bool:
        if not path or key[: len(path)] != path[: len(key)]:
            return False
        return len(key) <= len(path) or f"`{'.'.join(key)}`" in problem or f"{'.'.join(key)} " in problem

    texts = [text for text in overrides if behind(parse_override(text)[0])]
    return f" (from --set {', --set '.join(texts)})" if texts else ""


def _describe_problem(e: Any, loc: tuple) -> str:
    where = _fmt_loc(loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        return f"unknown key `{where}`{hint}"
    if kind == "missing":
        return f"`{where}` is required but missing"
    msg = e["msg"].removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = "expected a section (a mapping of keys to values)"
    given = e.get("input")
    if isinstance(given, dict):  # a check across a section's keys: the message names them
        return f"`{where}`: {msg}"
    given_s = repr(given) if len(repr(given)) <= 80 else type(given).__name__
    return f"`{where}` was given {given_s}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or flow collection)."""
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set has an empty part in the key path {key!r} (expected e.g. optim.lr=3e-4)")
    value_text = raw.strip()
    if not value_text:  # an unset shell variable, say (--set optim.lr=$LR): not a silent default
        raise UserError(f"--set {text}: no value after '='; expected a value, or null to drop the setting")
    if value_text.startswith("#") or re.search(r"\s#", value_text):
        return parts, value_text  # YAML would read a comment there and drop it: the text is the value
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or child is True:  # `true` stands for a section's defaults (attribution.fast)
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise UserError(
                    f"--set {text}: `{where}` is a value, not a section, so it has no `{parts[i + 1]}`"
                )
            node = child
        field = _field(parts)
        if value is None and field is not None and type(None) not in get_args(field.annotation):
            if _section_model(field.annotation) is not None:  # all of model:, say: a kind: cnn lost unseen
                raise UserError(
                    f"--set {text}: `{'.'.join(parts)}` is a section, which null would drop whole; "
                    f"expected a key inside it (--set {'.'.join(parts)}.KEY=null)"
                )
            node.pop(parts[-1], None)  # e.g. model.hidden=null: drop it, so its default applies
        else:
            node[parts[-1]] = value
    return raw


def recipe_from_dict(
    raw: Any, *, base_dir: Path | None = None, origin: str = "(inline)", overrides: Sequence[str] = ()
) -> Recipe:
    """Validate a recipe given as a dict and resolve its data paths against ``base_dir``;
    ``overrides`` (already applied to ``raw``) are named in the error of a field they set."""
    if not isinstance(raw, dict):
        raise UserError(
            f"invalid recipe {origin}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin, overrides)) from None
    scheme, rest = split_source(recipe.data.source)
    if takes_path(recipe.data.source):
        p = Path(rest).expanduser()
        if not p.is_absolute():
            p = (base_dir or Path.cwd()) / p
        p = p.resolve()
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise UserError(
                f"invalid recipe {origin}: `data.source` names the file {rest!r}, which {what} (looked at "
                f"{p}; relative paths are taken from the recipe's folder); expected a file."
            )
        recipe.data.source = f"{scheme}:{p}"
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: by default
    the last one would silently win (a second ``train:`` section replacing the first, say)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, run: str | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file. Raises ``UserError`` on any problem, which
    names the run the file belongs to where ``run`` is given (a run's saved recipe)."""
    path = Path(path)
    origin = f"{path}" if run is None else f"of run {run!r} ({path})"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"recipe file {path} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"recipe path {path} is a folder; expected a YAML file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe file {path}: {e}.") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"recipe file {path} is not valid YAML: {detail}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"invalid recipe {origin}: the top level must be a mapping (name:, data:, model:, ...), "
            f"got {type(raw).__name__}."
        )
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    return recipe_from_dict(raw, base_dir=path.resolve().parent, origin=origin, overrides=overrides)
