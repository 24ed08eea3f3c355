"""Bad input, generated (hypothesis): malformed recipes, overrides and data files make `adamshap train`
exit 2 with one message naming the problem, no traceback, and no run folder. Two trainings racing
for one run name: one wins, the other refuses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import cli, tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adamshap_core import runio
from adamshap_core.errors import UserError
from adamshap_core.recipe import RUN_NAME, Recipe

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    """A bad invocation: the recipe (a dict, or raw YAML text), data files, --set overrides, and the
    words the error message must contain to count as naming the problem."""

    recipe: dict | str
    names: list[str]
    files: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


def check_refused(case: Case, base: Path) -> None:
    work = Path(tempfile.mkdtemp(dir=base))
    for name, text in case.files.items():
        (work / name).write_text(text, encoding="utf-8")
    recipe = work / "recipe.yaml"
    raw = case.recipe
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    recipe.write_text(text, encoding="utf-8")
    runs = work / "runs"
    args = ["train", recipe, "--quiet", "--runs-dir", runs]
    for o in case.overrides:
        args += ["--set", o]
    res = cli(*args)  # catch_exceptions=False: any exception other than a refusal fails the test
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code} for {case}:\n{out}"
    assert "Traceback" not in out and out.lstrip().startswith("error:"), out
    flat = " ".join(out.split())
    for word in case.names:
        assert word in flat, f"the message does not name {word!r}: {flat}"
    assert not runs.exists() or not any(runs.iterdir()), "a run folder was left behind"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


def at(recipe: dict, path: str, value) -> dict:
    """``recipe`` with ``path`` (dotted) set to ``value``."""
    *parents, last = path.split(".")
    node = recipe
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return recipe


# --------------------------------------------------------------------------- value strategies


def _not_a_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
non_numeric_text = words.filter(_not_a_number)
fractional = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(
    lambda x: not float(x).is_integer()
)
containers = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(words, st.integers(), min_size=1, max_size=2),
)
non_finite = st.sampled_from([math.inf, -math.inf, math.nan])

SEED_MAX = 2**32 - 1
INT_FIELDS = {  # path -> (smallest, largest) allowed value, None: unbounded
    "train.epochs": (1, None),
    "train.batch_size": (1, None),
    "train.seed": (0, SEED_MAX),
    "train.checkpoint_every": (0, None),
    "data.seed": (0, SEED_MAX),
    "attribution.record_steps": (0, None),
    "optim.warmup_steps": (0, None),
    "model.n_layer": (1, None),
    "model.d_model": (1, None),
}
NUM_FIELDS = {  # path -> (low, low allowed?, high or None, high allowed?)
    "optim.lr": (0.0, False, None, False),
    "optim.eps": (0.0, False, None, False),
    "optim.weight_decay": (0.0, True, None, False),
    "data.label_noise": (0.0, True, 1.0, False),
    "train.grad_clip": (0.0, False, None, False),
}
CHOICE_FIELDS = {
    "model.kind": {"mlp", "cnn", "gpt", "hf-gpt2", "hf-llama"},
    "optim.name": {"adam", "adamw", "sgd"},
    "optim.schedule": {"constant", "cosine", "linear"},
    "train.device": {"auto", "cpu", "cuda"},
}


@st.composite
def wrong_int(draw) -> Case:
    path = draw(st.sampled_from(sorted(INT_FIELDS)))
    low, high = INT_FIELDS[path]
    bad = [fractional, non_numeric_text, containers, st.booleans(), st.integers(max_value=low - 1)]
    if high is not None:
        bad.append(st.integers(min_value=high + 1))
    return Case(at(tiny(), path, draw(st.one_of(bad))), [path])


@st.composite
def wrong_number(draw) -> Case:
    path = draw(st.sampled_from(sorted(NUM_FIELDS)))
    low, low_ok, high, _ = NUM_FIELDS[path]
    finite = {"allow_nan": False, "allow_infinity": False}
    below = st.floats(max_value=low, exclude_max=low_ok, **finite)
    bad = [non_numeric_text, containers, st.booleans(), non_finite, below]
    if high is not None:
        bad.append(st.floats(min_value=high, max_value=1e300, **finite))
    value = draw(st.one_of(bad))
    return Case(at(tiny(), path, value), [path])


@st.composite
def wrong_choice(draw) -> Case:
    path = draw(st.sampled_from(sorted(CHOICE_FIELDS)))
    value = draw(st.one_of(words.filter(lambda w: w not in CHOICE_FIELDS[path]), st.integers(), containers))
    return Case(at(tiny(), path, value), [path])


@st.composite
def wrong_list(draw) -> Case:
    which = draw(st.sampled_from(["hidden", "betas", "methods"]))
    if which == "hidden":
        value = draw(
            st.one_of(
                st.integers(),
                words,
                st.lists(st.integers(max_value=0), min_size=1, max_size=3),
                st.lists(non_numeric_text, min_size=1, max_size=2),
            )
        )
        return Case(at(tiny(), "model.hidden", value), ["model.hidden"])
    if which == "betas":
        beta = st.floats(min_value=0.0, max_value=0.99)
        out_of_range = st.one_of(
            st.floats(max_value=-1e-9, min_value=-1e9), st.floats(min_value=1.0, max_value=1e9)
        )
        value = draw(
            st.one_of(
                st.tuples(out_of_range, beta).map(list),
                st.tuples(beta, out_of_range).map(list),
                st.lists(beta, min_size=0, max_size=1),
                st.lists(beta, min_size=3, max_size=4),
                non_numeric_text,
            )
        )
        return Case(at(tiny(), "optim.betas", value), ["optim.betas"])
    value = draw(
        st.one_of(
            st.just([]),
            st.just(["adam", "adam"]),
            st.lists(words.filter(lambda w: w not in ("adam", "adam_fixed", "sgd")), min_size=1, max_size=2),
            st.sampled_from(["adam", "sgd"]),  # a string, not a list
        )
    )
    return Case(at(tiny(), "attribution.methods", value), ["attribution.methods"])


@st.composite
def wrong_split_size(draw) -> Case:
    path = draw(st.sampled_from(["data.val_size", "data.test_size"]))
    value = draw(
        st.one_of(
            st.integers(max_value=0, min_value=-(10**9)),
            st.floats(min_value=1.0001, max_value=1e6).filter(lambda x: not x.is_integer()),
            st.integers(min_value=149, max_value=10**6),  # iris has 150 rows: nothing left to train on
            st.booleans(),
            non_numeric_text,
        )
    )
    return Case(at(tiny(), path, value), [path])


@st.composite
def unknown_key(draw) -> Case:
    section = draw(st.sampled_from(["(top level)", "data", "model", "optim", "train", "attribution"]))
    allowed = (
        set(Recipe.model_fields)
        if section == "(top level)"
        else set(Recipe.model_fields[section].annotation.model_fields)
    )
    key = draw(st.from_regex(r"[a-z][a-z_0-9]{0,15}", fullmatch=True).filter(lambda k: k not in allowed))
    recipe = tiny()
    if section == "(top level)":
        recipe[key] = draw(st.integers())
        return Case(recipe, [f"unknown key `{key}`"])
    recipe[section][key] = draw(st.integers())
    return Case(recipe, [f"unknown key `{section}.{key}`"])


@st.composite
def wrong_section(draw) -> Case:
    section = draw(st.sampled_from(["data", "model", "optim", "train", "attribution"]))
    recipe = tiny()
    recipe[section] = draw(st.one_of(st.integers(), words, st.lists(st.integers(), min_size=1, max_size=2)))
    return Case(recipe, [f"`{section}`", "expected a section"])


@st.composite
def missing_field(draw) -> Case:
    path = draw(st.sampled_from(["name", "data", "data.source"]))
    recipe = tiny()
    if path == "data.source":
        del recipe["data"]["source"]
    else:
        del recipe[path]
    return Case(recipe, [f"`{path}` is required"])


@st.composite
def bad_name_or_source(draw) -> Case:
    if draw(st.booleans()):
        name = draw(st.one_of(st.just(""), words.filter(lambda w: not RUN_NAME.match(w))))
        return Case(at(tiny(), "name", name), ["`name`"])
    source = draw(
        st.one_of(
            st.from_regex(r"[a-z]{1,8}:[a-z]{1,8}", fullmatch=True).filter(
                lambda s: not s.startswith(("sklearn:", "csv:", "parquet:", "jsonl:", "text:", "builtin:"))
            ),
            st.from_regex(r"sklearn:[a-z]{1,8}", fullmatch=True).filter(
                lambda s: s.split(":")[1] not in ("digits", "wine", "iris", "breast_cancer")
            ),
            st.just(""),
        )
    )
    return Case(at(tiny(), "data.source", source), ["`data.source`"])


RECIPE_CASES = st.one_of(
    wrong_int(),
    wrong_number(),
    wrong_choice(),
    wrong_list(),
    wrong_split_size(),
    unknown_key(),
    wrong_section(),
    missing_field(),
    bad_name_or_source(),
)


@FAST
@given(case=RECIPE_CASES)
def test_malformed_recipes_are_refused_naming_the_field(case, base):
    check_refused(case, base)


# --------------------------------------------------------------------------- bad data files


def csv_text(rows: list[list], header=("a", "b", "y")) -> str:
    return "\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n"


def csv_recipe(**data) -> dict:
    return tiny(
        data={"source": "csv:d.csv", "target": "y", "val_size": 5, "test_size": 5, "label_noise": 0, **data}
    )


feature = st.integers(-50, 50)
good_rows = st.lists(
    st.tuples(feature, feature, st.integers(0, 2)).map(list), min_size=30, max_size=60
).filter(lambda rows: len({r[2] for r in rows}) >= 2)
letters = st.from_regex(r"[a-zA-Z][a-zA-Z ]{0,8}", fullmatch=True)


@st.composite
def bad_csv(draw) -> Case:
    rows = draw(good_rows)
    kind = draw(
        st.sampled_from(
            [
                "empty",
                "header-only",
                "no-target",
                "target-unset",
                "text-feature",
                "one-class",
                "blank-feature",
                "blank-label",
                "missing-file",
                "too-few-rows",
            ]
        )
    )
    recipe = csv_recipe()
    if kind == "empty":
        return Case(recipe, ["`data.source`"], {"d.csv": ""})
    if kind == "header-only":
        return Case(recipe, ["`data.source`", "no rows"], {"d.csv": csv_text([])})
    if kind == "no-target":
        target = draw(st.from_regex(r"[a-z]{1,6}", fullmatch=True).filter(lambda t: t not in ("a", "b", "y")))
        return Case(csv_recipe(target=target), ["`data.target`", repr(target)], {"d.csv": csv_text(rows)})
    if kind == "target-unset":
        del recipe["data"]["target"]
        return Case(recipe, ["`data.target`"], {"d.csv": csv_text(rows)})
    i = draw(st.integers(0, len(rows) - 1))
    if kind == "text-feature":
        rows[i][draw(st.integers(0, 1))] = draw(letters)
        return Case(recipe, ["`data.source`", "numeric"], {"d.csv": csv_text(rows)})
    if kind == "one-class":
        rows = [[a, b, 1] for a, b, _ in rows]
        return Case(recipe, ["`data.target`", "class"], {"d.csv": csv_text(rows)})
    if kind == "blank-feature":
        rows[i][0] = ""
        where = (
            f"1 empty or non-finite cell(s), the first in data row {i} (from 0), column 'a' (empty or NaN)"
        )
        return Case(recipe, ["`data.source`", where], {"d.csv": csv_text(rows)})
    if kind == "blank-label":
        rows[i][2] = ""
        return Case(
            recipe,
            ["`data.target`", f"1 empty cell(s), the first in data row {i}"],
            {"d.csv": csv_text(rows)},
        )
    if kind == "missing-file":
        return Case(recipe, ["`data.source`", "does not exist"])
    return Case(csv_recipe(val_size=20, test_size=20), ["`data.val_size`"], {"d.csv": csv_text(rows[:30])})


blank_line = st.sampled_from(["", " ", "\t", "   ", " \t "])
text_line = st.from_regex(r"[a-z]{1,6}( [a-z]{1,6}){0,4}", fullmatch=True)
GPT = {"kind": "gpt", "n_layer": 1, "d_model": 8, "n_head": 2}


def text_recipe(source: str, **data) -> dict:
    return tiny(data={"source": source, "val_size": 1, "test_size": 1, "label_noise": 0, **data}, model=GPT)


@st.composite
def bad_corpus(draw) -> Case:
    kind = draw(
        st.sampled_from(
            ["only-blank-lines", "too-few-texts", "jsonl-empty-text", "jsonl-bad-line", "mlp-on-text"]
        )
    )
    if kind == "only-blank-lines":
        lines = draw(st.lists(blank_line, min_size=0, max_size=8))
        return Case(text_recipe("text:c.txt"), ["`data.source`", "no texts"], {"c.txt": "\n".join(lines)})
    if kind == "too-few-texts":  # blank lines do not count: 1 or 2 texts leave nothing after val and test
        texts = draw(st.lists(text_line, min_size=1, max_size=3))
        lines = [x for t in texts for x in (t, draw(blank_line))]
        return Case(text_recipe("text:c.txt"), ["`data.val_size`"], {"c.txt": "\n".join(lines)})
    texts = draw(st.lists(text_line, min_size=8, max_size=12))
    records = [json.dumps({"text": t}) for t in texts]
    i = draw(st.integers(0, len(records) - 1))
    if kind == "jsonl-empty-text":
        records[i] = json.dumps({"text": draw(blank_line)})
        return Case(
            text_recipe("jsonl:c.jsonl"), ["`data.source`", f"line {i + 1}"], {"c.jsonl": "\n".join(records)}
        )
    if kind == "jsonl-bad-line":
        records[i] = draw(st.sampled_from(['{"text": "a', "[1, 2]", '"just a string"', "{text: 1}"]))
        return Case(
            text_recipe("jsonl:c.jsonl"), ["`data.source`", f"line {i + 1}"], {"c.jsonl": "\n".join(records)}
        )
    recipe = text_recipe("text:c.txt")
    recipe["model"] = {"kind": "mlp"}
    return Case(recipe, ["`model.kind`"], {"c.txt": "\n".join(texts)})


@FAST
@given(case=st.one_of(bad_csv(), bad_corpus()))
def test_bad_data_files_are_refused_naming_the_problem(case, base):
    check_refused(case, base)


def _training_split_without(cls: int, y: list[int], val_size: int, test_size: int) -> int:
    """A data.seed whose split leaves every row of class ``cls`` out of training."""
    import numpy as np

    from adamshap_core.data.tabular import split_indices

    for seed in range(200):
        train, _, _ = split_indices(np.array(y), val_size, test_size, seed)
        if cls not in {y[i] for i in train}:
            return seed
    raise AssertionError("no such seed")


def _data_cases() -> list[Case]:
    rows = [[i % 7, i % 5, i % 3] for i in range(40)]
    rare_y = [0] * 39 + [1]
    rare_seed = _training_split_without(1, rare_y, 5, 5)
    return [
        Case(
            csv_recipe(),
            ["`data.source`", "a", "too large"],
            {"d.csv": csv_text([[1e308, 1, y] for *_, y in rows])},
        ),
        Case(
            csv_recipe(),
            ["`data.target`", "fractional"],
            {"d.csv": csv_text([[a, b, y + 0.5] for a, b, y in rows])},
        ),
        Case(
            csv_recipe(seed=rare_seed),
            ["`data.seed`", "only class 0"],
            {"d.csv": csv_text([[a, b, y] for (a, b, _), y in zip(rows, rare_y, strict=True)])},
        ),
        Case(tiny(), ["`optim.warmup_steps`", "more than the run's"], overrides=["optim.warmup_steps=1000"]),
        Case(
            tiny(),
            ["`attribution.val_batch`", "20 validation examples"],
            overrides=["attribution.val_batch=21"],
        ),
    ]


@pytest.mark.parametrize(
    "case", _data_cases(), ids=["huge-feature", "fractional-target", "rare-class", "warmup", "val-batch"]
)
def test_inputs_that_would_be_cut_or_overflow_silently_are_refused(case, base):
    check_refused(case, base)


def test_running_out_of_memory_in_a_step_is_bad_input(tmp_path, monkeypatch):
    """As the CPU allocator reports it (a RuntimeError): exit 2 naming the step and what to shrink."""
    from adamshap_core import train

    def no_memory(*args):
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 25602560064 bytes."
        )

    monkeypatch.setattr(train, "_take_step", no_memory)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    res = cli("train", recipe, "--quiet", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "Traceback" not in res.output
    said = " ".join(res.output.split())
    assert "out of memory at step 1" in said and "min_pearson" not in said
    # a fast mode that checks its reuse names the setting that halves what its checks hold
    recipe.write_text(yaml.safe_dump(tiny(attribution={"fast": True})))
    res = cli("train", recipe, "--quiet", "--runs-dir", tmp_path / "runs2")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "attribution.fast.min_pearson: null turns them off" in said


# --------------------------------------------------------------------------- bad YAML and --set


@st.composite
def bad_yaml_text(draw) -> Case:
    kind = draw(st.sampled_from(["unbalanced", "top-level-list", "top-level-scalar", "empty", "tab-indent"]))
    if kind == "unbalanced":
        return Case(f"name: tiny\ndata: {{source: [{draw(text_line)}\n", ["not valid YAML"])
    if kind == "top-level-list":
        return Case(yaml.safe_dump(draw(st.lists(st.integers(), min_size=1, max_size=3))), ["top level"])
    if kind == "top-level-scalar":
        return Case(draw(text_line) + "\n", ["top level"])
    if kind == "empty":
        return Case(draw(st.sampled_from(["", "\n", "# only a comment\n"])), ["`name` is required"])
    return Case("name: tiny\ndata:\n\tsource: sklearn:iris\n", ["not valid YAML"])


@st.composite
def bad_override(draw) -> Case:
    kind = draw(
        st.sampled_from(["no-equals", "empty-part", "value-not-section", "unknown-section", "bad-value"])
    )
    if kind == "no-equals":
        return Case(tiny(), ["--set"], overrides=[draw(st.from_regex(r"[a-z.]{1,12}", fullmatch=True))])
    if kind == "empty-part":
        return Case(
            tiny(),
            ["--set", "empty part"],
            overrides=[draw(st.sampled_from([".lr=1", "optim..lr=1", "optim.=1"]))],
        )
    if kind == "value-not-section":
        return Case(tiny(), ["`train.epochs` is a value"], overrides=["train.epochs.x=1"])
    if kind == "unknown-section":
        key = draw(
            st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(lambda k: k not in Recipe.model_fields)
        )
        return Case(tiny(), [f"unknown key `{key}`"], overrides=[f"{key}.x=1"])
    path = draw(st.sampled_from(["optim.lr", "train.epochs", "train.batch_size"]))
    return Case(tiny(), [path], overrides=[f"{path}={draw(non_numeric_text.filter(lambda t: '=' not in t))}"])


@FAST
@given(case=st.one_of(bad_yaml_text(), bad_override()))
def test_bad_yaml_and_overrides_are_refused(case, base):
    check_refused(case, base)


@pytest.mark.parametrize(
    "override,names",
    [
        ("optim.lr=#", ["optim.lr", "'#'"]),  # YAML would read a comment: null, so the default
        ("optim.lr=# 3e-4", ["optim.lr", "'# 3e-4'"]),
        ("optim.lr=", ["--set optim.lr=", "no value"]),  # an unset shell variable: --set optim.lr=$LR
        ("train.epochs= ", ["no value"]),
    ],
    ids=["hash", "hash-comment", "empty", "blank"],
)
def test_an_override_value_is_never_a_silent_default(override, names, base):
    """Found by the generated cases above: a value YAML reads as a comment, or no value at all, was
    taken as null, which drops the setting, so training went on with the default."""
    check_refused(Case(tiny(), names, overrides=[override]), base)


# --------------------------------------------------------------------------- racing for one run name


@pytest.mark.parametrize(
    "command", [["train", "RECIPE"], ["runs"], ["compare"], ["prune", "--frac", "0.3"], ["attribute"]]
)
def test_a_runs_folder_that_is_a_file_is_refused(tmp_path, command):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    args = [recipe if a == "RECIPE" else a for a in command]
    res = cli(*args, "--runs-dir", blocker)
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert flat.startswith(f"error: the runs folder {blocker} (--runs-dir) is a file; expected a folder.")
    assert blocker.read_text() == "not a folder"


def test_threads_racing_to_create_one_run_folder(tmp_path):
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[str] = []

    def contender():
        barrier.wait()
        try:
            runio.create_run_dir(tmp_path, "race")
            outcomes.append("won")
        except UserError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=contender) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1
    assert all("already exists" in o for o in outcomes if o != "won")


@pytest.mark.slow  # two real `adamshap train` processes
def test_two_train_processes_racing_for_one_name(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    cmd = [
        sys.executable,
        "-m",
        "adamshap_cli",
        "train",
        str(recipe),
        "--quiet",
        "--runs-dir",
        str(tmp_path / "runs"),
    ]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    said = " ".join(loser.split())  # the folder made, or also locked, by the winner
    assert ("already exists" in said or "is being written by process" in said) and "Traceback" not in loser
    assert json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["status"] == "complete"
