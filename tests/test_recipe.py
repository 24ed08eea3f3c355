"""The recipe schema: defaults, overrides, path resolution, and messages that name the field."""

from __future__ import annotations

import pytest
import yaml
from helpers import TINY, tiny, write_recipe

from adamshap_core.errors import UserError
from adamshap_core.fast import FastMode
from adamshap_core.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict


def test_minimal_recipe_gets_defaults():
    r = recipe_from_dict({"name": "x", "data": {"source": "sklearn:digits"}})
    assert r.optim.name == "adam" and r.optim.lr == 1e-3 and r.optim.betas == (0.9, 0.999)
    assert r.train.epochs >= 1 and r.train.device == "auto" and r.train.grad_clip is None
    assert r.attribution.enabled and r.attribution.methods == ["adam", "adam_fixed", "sgd"]
    assert r.attribution.val_batch is None and r.attribution.record_steps == 8
    assert r.attribution.fuse_validation is False
    assert r.data.label_noise == 0.0 and r.model.kind == "mlp"


def test_yaml_round_trip(tmp_path):
    r = load_recipe(write_recipe(tmp_path, TINY))
    again = load_recipe(write_recipe(tmp_path, r.to_yaml(), "again.yaml"))
    assert again == r
    assert yaml.safe_load(r.to_yaml())["optim"]["betas"] == [0.9, 0.999]


def test_overrides_parse_yaml_scalars(tmp_path):
    p = write_recipe(tmp_path, TINY)
    r = load_recipe(
        p,
        [
            "optim.lr=3e-4",
            "train.grad_clip=1.5",
            "attribution.methods=[adam, sgd]",
            "optim.schedule=cosine",
            "attribution.val_batch=null",
            "data.val_size=0.2",
        ],
    )
    assert r.optim.lr == pytest.approx(3e-4) and r.train.grad_clip == 1.5
    assert r.attribution.methods == ["adam", "sgd"] and r.optim.schedule == "cosine"
    assert r.data.val_size == pytest.approx(0.2)


def test_string_numbers_from_yaml_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; it is still a valid learning rate.
    p = write_recipe(tmp_path, "name: a\ndata: {source: 'sklearn:iris'}\noptim: {lr: 1e-3, eps: 1e-8}\n")
    r = load_recipe(p)
    assert r.optim.lr == pytest.approx(1e-3) and r.optim.eps == pytest.approx(1e-8)


@pytest.mark.parametrize(
    "override, field, fragment",
    [
        ("model.foo=1", "model.foo", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        # a section that may be null lists its keys as the others do
        ("data.facts.n_fact=3", "data.facts.n_fact", "allowed keys here: n_facts, seed"),
        ("attribution.fast.rnk=2", "attribution.fast.rnk", "allowed keys here: refresh_every, warmup, rank"),
        ("train.epochs=five", "train.epochs", "'five'"),
        ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
        ("train.batch_size=true", "train.batch_size", "True"),
        ("optim.lr=-0.1", "optim.lr", "greater than 0"),
        ("optim.lr=0", "optim.lr", "greater than 0"),
        ("optim.eps=0", "optim.eps", "greater than 0"),
        ("optim.lr=1e39", "optim.lr", "the largest float32"),
        ("optim.lr=1e38", "optim.lr", "Adam's first step size"),
        ("optim.eps=1e-50", "optim.eps", "the smallest normal float32"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]", "less than 1"),
        ("optim.name=rmsprop", "optim.name", "'adam', 'adamw' or 'sgd'"),
        ("optim.weight_decay=-1", "optim.weight_decay", "greater than or equal to 0"),
        ("optim.momentum=0.9", "optim.momentum", "only applies to sgd"),
        ("optim.schedule=step", "optim.schedule", "cosine"),
        ("optim.warmup_steps=-1", "optim.warmup_steps", "greater than or equal to 0"),
        ("data.label_noise=1.0", "data.label_noise", "less than 1"),
        ("data.label_noise=-0.1", "data.label_noise", "greater than or equal to 0"),
        ("data.source=sklearn:mnist", "data.source", "unknown dataset"),
        ("data.source=imagenet", "data.source", "unknown dataset"),
        ("data.val_size=0", "data.val_size", "at least 1"),
        ("data.test_size=1.5", "data.test_size", "between 0 and 1"),
        ("data.val_size=1.0", "data.val_size", "write 1 for one row"),
        ("model.kind=transformer", "model.kind", "Input should be 'mlp'"),
        ("model.hidden=[0]", "model.hidden[0]", "greater than or equal to 1"),
        ("train.grad_clip=0", "train.grad_clip", "greater than 0"),
        # numpy's and scikit-learn's seeds stop at 2**32 - 1: past it they raise their own error
        ("train.seed=4294967296", "train.seed", "less than or equal to 4294967295"),
        ("data.seed=-1", "data.seed", "greater than or equal to 0"),
        ("train.device=tpu", "train.device", "'auto', 'cpu' or 'cuda'"),
        ("train.checkpoint_every=-5", "train.checkpoint_every", "greater than or equal to 0"),
        ("attribution.methods=[]", "attribution.methods", "at least one method"),
        ("attribution.methods=[adam, adam]", "attribution.methods", "once"),
        ("attribution.methods=[tracin]", "attribution.methods[0]", "'adam', 'adam_fixed' or 'sgd'"),
        ("attribution.val_batch=0", "attribution.val_batch", "greater than or equal to 1"),
        ("attribution.record_steps=-1", "attribution.record_steps", "greater than or equal to 0"),
        ("attribution.enabled=maybe", "attribution.enabled", "valid boolean"),
        ("attribution.fuse_validation=1", "attribution.fuse_validation", "valid boolean"),
        ("name=a/b", "name", "run name"),
        ("name=" + "a" * 201, "name", "at most 200 characters"),
        ("data=3", "data", "section"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, field, fragment):
    p = write_recipe(tmp_path, TINY)
    with pytest.raises(UserError) as e:
        load_recipe(p, [override])
    msg = str(e.value)
    assert f"`{field}`" in msg, msg
    assert fragment in msg, msg
    assert str(p) in msg


def test_the_largest_seed_numpy_takes_is_accepted(tmp_path):
    assert load_recipe(write_recipe(tmp_path, TINY), ["train.seed=4294967295"]).train.seed == 2**32 - 1


@pytest.mark.parametrize("setting", ["optim.betas=[0.5, 0.5]", "optim.eps=0.1"])
def test_adam_settings_with_sgd_are_refused_and_an_sgd_recipe_loads_again(tmp_path, setting):
    p = write_recipe(tmp_path, TINY)
    with pytest.raises(
        UserError, match=f"`optim.{setting.split('=')[0].split('.')[1]}` only applies to adam"
    ):
        load_recipe(p, ["optim.name=sgd", setting])
    saved = write_recipe(tmp_path, load_recipe(p, ["optim.name=sgd"]).to_yaml(), "saved.yaml")
    assert load_recipe(saved).optim.name == "sgd"  # its saved betas and eps are the defaults


def test_a_source_is_read_without_its_surrounding_spaces(tmp_path):
    """ "builtin:facts " is builtin:facts: its generator settings are filled in, not refused."""
    rec = recipe_from_dict({"name": "t", "data": {"source": " builtin:facts "}, "model": {"kind": "gpt"}})
    assert rec.data.source == "builtin:facts" and rec.data.facts is not None


def test_missing_required_fields(tmp_path):
    with pytest.raises(UserError, match="`name` is required"):
        load_recipe(write_recipe(tmp_path, {"data": {"source": "sklearn:iris"}}))
    with pytest.raises(UserError, match="`data.source` is required"):
        load_recipe(write_recipe(tmp_path, {"name": "a", "data": {}}))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("name: [\n", "not valid YAML"),
        ("", "`name` is required"),
    ],
)
def test_bad_files(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment):
        load_recipe(write_recipe(tmp_path, text))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a folder"):
        load_recipe(tmp_path)


def test_bad_override_syntax(tmp_path):
    p = write_recipe(tmp_path, TINY)
    with pytest.raises(UserError, match="key.path=value"):
        load_recipe(p, ["optim.lr"])
    with pytest.raises(UserError, match="not a section"):
        load_recipe(p, ["name.first=x"])
    with pytest.raises(UserError, match="not a section"):
        load_recipe(p, ["attribution.fast=false", "attribution.fast.rank=4"])


def test_null_drops_a_key_that_cannot_be_null_and_keeps_null_where_it_can(tmp_path):
    """`--set optim.betas=null` undoes a file's setting (here one that `optim.name=sgd` refuses);
    a nullable field still takes null itself."""
    p = write_recipe(tmp_path, tiny(optim={"betas": [0.5, 0.5]}, train={"grad_clip": 1.0}))
    with pytest.raises(UserError, match="only applies to adam"):
        load_recipe(p, ["optim.name=sgd"])
    r = load_recipe(p, ["optim.name=sgd", "optim.betas=null", "model.hidden=null", "train.grad_clip=null"])
    default = Recipe.model_validate({"name": "x", "data": {"source": "sklearn:iris"}})
    assert r.optim.betas == default.optim.betas and r.model.hidden == default.model.hidden != [8]
    assert r.train.grad_clip is None


def test_an_error_names_the_override_behind_it_and_only_that_one(tmp_path):
    p = write_recipe(tmp_path, tiny(train={"epochs": 0}))
    with pytest.raises(UserError) as e:
        load_recipe(p, ["optim.lr=3e-4", "model.hidden=[a]"])
    msg = str(e.value)
    assert "`model.hidden[0]` was given 'a'" in msg and "(from --set model.hidden=[a])" in msg, msg
    assert "`train.epochs` was given 0" in msg and msg.count("from --set") == 1, msg
    assert "optim.lr" not in msg, msg
    with pytest.raises(UserError, match=r"remove it \(from --set model.kind=gpt\)\.$"):  # not n_head's
        load_recipe(p, ["train.epochs=1", "model.kind=gpt", "model.n_head=3"])


def test_null_for_a_whole_section_is_refused():
    """`--set model=null` would drop a recipe's whole model section (a kind: cnn lost unseen)."""
    with pytest.raises(UserError, match=r"`model` is a section, which null would drop whole"):
        apply_overrides(tiny(), ["model=null"])
    assert apply_overrides(tiny(), ["data.facts=null"])["data"]["facts"] is None  # a section null selects


def test_a_key_set_inside_a_section_given_as_true_keeps_the_sections_other_defaults(tmp_path):
    p = write_recipe(tmp_path, TINY)
    recipe = load_recipe(p, ["attribution.fast=true", "attribution.fast.min_pearson=null"])
    assert recipe.attribution.fast == FastMode(min_pearson=None)


def test_csv_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.csv").write_text("a,b,y\n1,2,0\n3,4,1\n")
    sub = tmp_path / "recipes"
    sub.mkdir()
    r = load_recipe(write_recipe(sub, tiny(data={"source": "csv:../data/t.csv", "target": "y"})))
    assert r.data.source == f"csv:{(tmp_path / 'data' / 't.csv').resolve()}"
    with pytest.raises(UserError, match="`data.source` names the file"):
        load_recipe(write_recipe(sub, tiny(data={"source": "csv:missing.csv", "target": "y"})))
    with pytest.raises(UserError, match="`data.target` .the label column. is required"):
        load_recipe(write_recipe(sub, tiny(data={"source": "csv:../data/t.csv"})))


def test_schema_forbids_extra_keys_everywhere():
    for model in [
        Recipe,
        *[f.annotation for f in Recipe.model_fields.values() if hasattr(f.annotation, "model_config")],
    ]:
        assert model.model_config.get("extra") == "forbid", model


def test_the_recipe_names_exactly_the_methods_that_have_rules():
    from adamshap_core.choices import METHOD_NAMES
    from adamshap_core.precond import METHODS

    assert tuple(METHODS) == METHOD_NAMES


def test_the_recipe_names_exactly_the_transformers_models_that_are_built():
    from adamshap_core.choices import HF_MODEL_KINDS
    from adamshap_core.models.hf import HF_MODELS

    assert tuple(HF_MODELS) == HF_MODEL_KINDS


def test_a_step_row_keeps_the_order_checkpoints_of_format_3_were_written_in():
    """Checkpoints keep the step rows by position: another order would read older checkpoints'
    columns under other names. Change it only with a new checkpoint.FORMAT."""
    from adamshap_core.checkpoint import FORMAT
    from adamshap_core.run_tables import STEP_COLUMNS

    assert FORMAT == 3
    written = ("step", "epoch", "lr", "train_loss", "val_loss", "clip_factor", "seconds", "reuse_pearson")
    assert written == STEP_COLUMNS


def test_set_splits_at_the_first_equals_sign():
    """A value may hold an '=' (a hive-style path)."""
    from adamshap_core.recipe import apply_overrides, parse_override

    path = "parquet:data/year=2024/t.parquet"
    assert parse_override(f"data.source={path}") == (["data", "source"], path)
    assert apply_overrides({"data": {"source": "sklearn:iris"}}, ["data.source=csv:a=b.csv"]) == {
        "data": {"source": "csv:a=b.csv"}
    }
