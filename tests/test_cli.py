"""The CLI end to end on a tiny recipe: train writes the run folder contract; runs lists it;
bad input exits 2 with a message naming the field, no traceback and no run folder."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from helpers import TINY, cli, tiny, tiny_gpt, write_recipe


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("ADAMSHAP_RUNS", str(root))
    return root


def test_train_writes_the_run_folder(tmp_path, runs):
    recipe = write_recipe(tmp_path, TINY)
    res = cli("train", recipe, "--quiet", "--set", "train.epochs=2")
    assert res.exit_code == 0, res.output
    hint = "next: adamshap compare --run tiny | adamshap prune --run tiny --frac 0.3"
    assert hint in " ".join(res.output.split())
    run = runs / "tiny"
    assert sorted(os.listdir(run)) == sorted(
        ["recipe.yaml", "values.parquet", "steps.parquet", "steps_values.parquet", "metrics.json"]
    )
    values = pd.read_parquet(run / "values.parquet")
    assert list(values.columns[:6]) == [
        "example_id",
        "value_adam",
        "value_adam_fixed",
        "value_sgd",
        "n_steps",
        "label",
    ]
    assert "is_noisy" in values.columns and values["is_noisy"].sum() == round(0.2 * len(values))
    assert values["example_id"].is_unique and (values["n_steps"] == 2).all()
    assert values[["value_adam", "value_adam_fixed", "value_sgd"]].notna().all().all()
    steps = pd.read_parquet(run / "steps.parquet")
    assert {"step", "lr", "train_loss", "val_loss", "seconds"} <= set(steps.columns)
    assert steps["step"].tolist() == list(range(1, len(steps) + 1))
    sv = pd.read_parquet(run / "steps_values.parquet")
    assert list(sv.columns) == ["step", "example_id", "value_adam", "value_adam_fixed", "value_sgd"]
    assert sorted(sv["step"].unique()) == [1, 2, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["schema_version"] == 1 and metrics["status"] == "complete"
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["val_accuracy"] <= 1
    assert metrics["methods"] == ["adam", "adam_fixed", "sgd"] and metrics["wall_seconds"] > 0
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["optim"]["betas"] == [0.9, 0.999]
    # the summary, from its first line on (--quiet prints nothing above it)
    out = res.stdout
    assert out.startswith("done: trained in ")
    assert "test accuracy" in out and "5 highest and 5 lowest" in out and "lowest-valued 20%" in out
    assert str(run) in out.replace("\n", "")

    # refuses to overwrite, then replaces with --force
    again = cli("train", recipe, "--quiet")
    assert again.exit_code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    forced = cli("train", recipe, "--force", "--set", "attribution.enabled=false")  # not --quiet
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.startswith("done: trained in ")  # the notes and the blank line go to stderr
    assert "value_adam" not in pd.read_parquet(run / "values.parquet").columns

    # runs lists it
    listed = cli("runs")
    assert listed.exit_code == 0 and "tiny" in listed.stdout and "complete" in listed.stdout


@pytest.mark.parametrize("width", [80, 100])
def test_runs_never_cut_a_run_name(tmp_path, runs, monkeypatch, width):
    """The names are typed back into --run: on an 80-column terminal they stay whole, each on one line,
    and the other columns wrap between their words instead."""
    from adamshap_cli import common

    names = ["breast-cancer-mlp", "digits-mlp-clean"]
    for name in names:
        (runs / name).mkdir(parents=True)
        metrics = {"status": "complete", "recipe": "breast-cancer-mlp", "created": "2026-01-01T00:00:00"}
        metrics |= {"test_accuracy": 0.947, "methods": ["adam", "adam_fixed", "sgd"]}
        (runs / name / "metrics.json").write_text(json.dumps(metrics))
    monkeypatch.setattr(common.console, "_width", width)
    listed = cli("runs")
    assert listed.exit_code == 0, listed.output
    table = [line for line in listed.stdout.splitlines() if line[:1] in "┏┃┡│└"]
    assert max(map(len, table)) <= width and "…" not in listed.stdout
    for name in names:
        assert any(line.startswith(f"│ {name} ") for line in table), listed.stdout
    assert "adam_fixed," in listed.stdout and "2026-01-01" in listed.stdout  # wrapped, not broken


def test_a_taken_run_name_is_refused_before_the_data_is_loaded(tmp_path, runs, monkeypatch):
    from adamshap_core import train as train_module
    from adamshap_core.locks import run_lock

    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "metrics.json").write_text(json.dumps({"status": "incomplete"}))
    monkeypatch.setattr(train_module, "prepare", lambda *a: pytest.fail("the data was loaded"))
    recipe = write_recipe(tmp_path, TINY)
    res = cli("train", recipe)
    assert res.exit_code == 2 and "already exists" in res.stderr
    with run_lock(runs / "tiny"):
        res = cli("train", recipe, "--force")
    assert res.exit_code == 2 and "is being written by process" in " ".join(res.stderr.split())


def test_runs_tells_a_run_still_training_from_one_that_stopped(tmp_path, runs, monkeypatch):
    from adamshap_cli import common

    from adamshap_core.locks import run_lock

    monkeypatch.setattr(common.console, "_width", 200)

    for name in ("stopped", "training"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"status": "incomplete", "recipe": "r"}))
    with run_lock(runs / "training"):
        listed = " ".join(cli("runs").stdout.split())
    assert "incomplete, written by process" in listed and "(adamshap train)" in listed
    assert listed.count("written by") == 1


def test_train_with_name_and_runs_dir(tmp_path):
    recipe = write_recipe(tmp_path, tiny(attribution={"methods": ["sgd"], "record_steps": 0}))
    res = cli("train", recipe, "--quiet", "--name", "other", "--runs-dir", tmp_path / "elsewhere")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "elsewhere" / "other" / "metrics.json").exists()
    assert cli("runs", "--runs-dir", tmp_path / "nowhere").stdout.startswith("no runs")


BAD = [
    ({**TINY, "extra": 1}, "`extra`"),
    (tiny(model={"hidden": "wide"}), "`model.hidden`"),
    (tiny(optim={"lr": -1e-3}), "`optim.lr`"),
    (tiny(data={"label_noise": 1.0}), "`data.label_noise`"),
    (tiny(data={"label_noise": -0.5}), "`data.label_noise`"),
    (tiny(data={"source": "sklearn:cifar"}), "`data.source`"),
    (tiny(data={"source": "csv:missing.csv", "target": "y"}), "`data.source`"),
    (tiny(model={"kind": "cnn"}), "`model.kind`"),
    (tiny(data={"val_size": 140}), "`data.val_size`"),
]


@pytest.mark.parametrize("recipe, field", BAD, ids=[b[1].strip("`") for b in BAD])
def test_bad_recipes_exit_2(tmp_path, runs, recipe, field):
    res = cli("train", write_recipe(tmp_path, recipe), "--quiet")
    assert res.exit_code == 2
    assert field in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not runs.exists() or os.listdir(runs) == []


def test_missing_recipe_file_and_bad_option(tmp_path, runs):
    res = cli("train", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = cli("train", write_recipe(tmp_path, TINY), "--set", "optim.lr")
    assert res.exit_code == 2 and "key.path=value" in res.stderr
    res = cli("train", write_recipe(tmp_path, TINY), "--name", "../escape")
    assert res.exit_code == 2 and "run name" in res.stderr
    assert not runs.exists()


# click's wording: "No such option: --bogus" (typer's own click, click 8.1) or "No such option '--bogus'."
NO_SUCH_OPTION = re.compile(r"error: No such option(: --bogus| '--bogus'\.) \(see `adamshap train -h`\)")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--bogus"], NO_SUCH_OPTION),
        (["prune"], "error: Missing option '--frac'. (see `adamshap prune -h`)"),
        (["attribute", "--top", "0"], "error: Invalid value for '--top'"),
        (["compare", "--permutations", "abc"], "error: Invalid value for '--permutations'"),
        (["bogus"], "error: No such command 'bogus'. (see `adamshap -h`)"),
    ],
)
def test_options_the_parser_refuses_get_the_same_error_line(args, message):
    res = cli(*args)
    assert res.exit_code == 2 and res.stdout == ""
    said = " ".join(res.stderr.split())
    assert message.match(said) if isinstance(message, re.Pattern) else said.startswith(message), res.stderr
    assert "─" not in res.stderr and "Usage" not in res.stderr  # one paragraph, not a boxed panel


def test_version_is_the_package_version():
    from importlib.metadata import version

    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"adamshap {version('adamshap')}"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path, tiny(optim={"lr": -1}))
    env = {**os.environ, "ADAMSHAP_RUNS": str(tmp_path / "runs")}
    p = subprocess.run(
        [sys.executable, "-m", "adamshap_cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert (
        "`optim.lr`" in p.stderr
        and "greater than 0" in p.stderr
        and str(recipe) in p.stderr.replace("\n", "")
    )
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "runs").exists()
    usage = subprocess.run([sys.executable, "-m", "adamshap_cli", "train"], capture_output=True, text=True)
    assert usage.returncode == 2 and "RECIPE" in usage.stderr


def test_help_imports_no_heavy_library():
    """``adamshap --help`` and each command's ``--help`` must not import torch or pandas: ~2 s on a CPU."""
    code = (
        "import contextlib, io, sys\n"
        "from adamshap_cli.main import app\n"
        "commands = ('train', 'runs', 'attribute', 'prune', 'bench', 'compare')\n"
        "for args in (['--help'], *([c, '--help'] for c in commands)):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        app(args, prog_name='adamshap')\n"
        "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'matplotlib', 'sklearn') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_ctrl_c_while_the_cli_loads_exits_130_with_one_line():
    """Ctrl-C before a command starts (imports, typer's parsing) stops at once, without a traceback
    and without typer's silent exit; the app is replaced by one that interrupts itself."""
    code = (
        "import os, signal, sys, time, types; "
        "stub = types.ModuleType('adamshap_cli.main'); "
        "stub.app = lambda **kwargs: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30)); "
        "sys.modules['adamshap_cli.main'] = stub; "
        "from adamshap_cli.__main__ import main; main()"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 130 and p.stderr.strip() == "stopped (Ctrl-C) before it finished.", p.stderr


def test_train_says_when_fused_validation_rows_take_the_separate_pass(tmp_path, runs):
    recipe = tiny_gpt(name="gpt-dropout", model={"dropout": 0.2}, attribution={"fuse_validation": True})
    res = cli("train", write_recipe(tmp_path, recipe))
    assert res.exit_code == 0, res.output
    assert "attribution.fuse_validation: the validation rows take the separate pass" in res.stderr
    metrics = json.loads((runs / "gpt-dropout" / "metrics.json").read_text())
    assert "drops out with p=0.2" in metrics["fusion_blocked"]


def test_ctrl_c_outside_train_exits_130_with_one_line_and_no_traceback(tmp_path, runs, monkeypatch):
    from adamshap_core import compare

    recipe = write_recipe(tmp_path, TINY)
    assert cli("train", recipe, "--quiet", "--set", "train.epochs=1").exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare_run", interrupted)
    res = cli("compare", "--quiet")
    assert res.exit_code == 130
    assert "stopped (Ctrl-C)" in res.output and "Traceback" not in res.output
    assert not (runs / "tiny" / "compare.parquet").exists()


def test_sigterm_outside_train_exits_143_with_one_line_and_no_traceback(tmp_path, runs, monkeypatch):
    """SIGTERM ends a command as Ctrl-C does (its ``finally`` blocks run), with its own line and exit
    code; the process's own SIGTERM handler is put back afterwards."""
    import signal

    from adamshap_core import compare

    before = signal.getsignal(signal.SIGTERM)
    recipe = write_recipe(tmp_path, TINY)
    assert cli("train", recipe, "--quiet", "--set", "train.epochs=1").exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(compare, "compare_run", terminated)
    res = cli("compare", "--quiet")
    assert res.exit_code == 143
    assert "stopped (SIGTERM) before it finished." in res.output and "Traceback" not in res.output
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_file_system_refusal_is_a_clear_error_not_a_traceback(tmp_path, runs, monkeypatch):
    """A folder the user cannot write to (or a full disk) is the user's to fix: exit 2, one line."""
    import errno

    from adamshap_core import runio

    def refused(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runio, "atomic_write", refused)
    res = cli("train", write_recipe(tmp_path, TINY), "--quiet")
    assert res.exit_code == 2, res.output
    said = " ".join(res.stderr.split())
    assert "Permission denied" in said and str(runs / "tiny") in res.stderr.replace("\n", "")
    assert "expected files and folders this user may read and write." in said
    assert "Traceback" not in res.output
    assert os.listdir(runs) == []  # no run folder left behind


def test_compare_and_prune_refuse_a_run_folder_they_cannot_write_before_any_work(tmp_path, runs, monkeypatch):
    from adamshap_core import compare, prune, runio

    assert cli("train", write_recipe(tmp_path, TINY), "--quiet").exit_code == 0
    worked = []
    monkeypatch.setattr(compare, "compare_run", lambda *a, **k: worked.append("compare"))
    monkeypatch.setattr(prune, "run_plan", lambda *a, **k: worked.append("prune"))
    real = runio.require_writable

    def read_only(folder):
        real(folder / "missing")  # as a folder that cannot be written into

    monkeypatch.setattr(runio, "require_writable", read_only)
    for command in (["compare", "--quiet"], ["prune", "--frac", "0.3", "--quiet"]):
        res = cli(*command)
        assert res.exit_code == 2 and "cannot write into" in res.stderr, res.output
    assert worked == []


def test_a_tiny_training_set_lists_each_example_once(tmp_path, runs):
    """Fewer than ten examples: the highest and the lowest valued lists share no row."""
    recipe = tiny(data={"source": "sklearn:iris", "val_size": 70, "test_size": 74}, train={"batch_size": 6})
    res = cli("train", write_recipe(tmp_path, recipe))
    assert res.exit_code == 0, res.output
    assert "3 highest and 3 lowest valued examples" in res.stdout


def test_a_recipe_key_given_twice_is_refused(tmp_path, runs):
    text = yaml.safe_dump(TINY, sort_keys=False) + "train:\n  epochs: 50\n"
    res = cli("train", write_recipe(tmp_path, text))
    assert res.exit_code == 2 and "the key 'train' is given twice" in res.stderr
    assert not runs.exists()


def test_model_fields_of_another_kind_are_refused(tmp_path, runs):
    res = cli("train", write_recipe(tmp_path, TINY), "--set", "model.n_layer=4")
    assert res.exit_code == 2
    assert "`model.n_layer` only applies to gpt, hf-gpt2 and hf-llama (model.kind is mlp)" in res.stderr


def test_train_refuses_an_empty_name_and_force_never_replaces_a_folder_that_is_not_a_run(tmp_path, runs):
    recipe = write_recipe(tmp_path, TINY)
    res = cli("train", recipe, "--name", "")
    assert res.exit_code == 2 and "run name ''" in res.stderr
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "notes.txt").write_text("precious")
    res = cli("train", recipe, "--name", "mine", "--force")
    assert res.exit_code == 2 and "exists and is not a run folder" in res.stderr
    assert (runs / "mine" / "notes.txt").read_text() == "precious"


def test_metrics_name_the_class_of_each_label_code(tmp_path, runs):
    rows = [f"{i % 5},{(i * 3) % 7},{['dog', 'cat', 'ant'][i % 3]}" for i in range(60)]
    (tmp_path / "d.csv").write_text("\n".join(["a,b,animal", *rows]) + "\n")
    recipe = tiny(
        data={"source": f"csv:{tmp_path / 'd.csv'}", "target": "animal", "val_size": 9, "test_size": 9}
    )
    res = cli("train", write_recipe(tmp_path, recipe), "-q")
    assert res.exit_code == 0, res.output
    assert {"ant", "cat", "dog"} & set(res.stdout.split())  # the tables show labels, not their codes
    run = runs / "tiny"
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    assert classes == ["ant", "cat", "dog"]
    values = pd.read_parquet(run / "values.parquet")
    source = pd.read_csv(tmp_path / "d.csv")
    named = [classes[c] for c in values["clean_label"]]
    assert named == source["animal"].iloc[values["source_row"]].tolist()


def test_no_run_takes_the_bench_folder_and_bench_never_writes_into_a_run(tmp_path, runs):
    recipe = write_recipe(tmp_path, TINY)
    res = cli("train", recipe, "--name", "bench")
    assert res.exit_code == 2 and "taken by `adamshap bench`" in res.stderr
    assert not runs.exists()
    assert cli("train", recipe, "--name", "old", "-q").exit_code == 0
    (runs / "old").rename(runs / "bench")  # a run named so before the name was taken
    res = cli("bench", recipe, "--steps", "1", "--repeats", "1", "-q")
    assert res.exit_code == 2 and "is a run's folder, where bench keeps its results" in res.stderr
    assert not any((runs / "bench").glob("*-*"))  # no bench results inside the run


@pytest.mark.parametrize("command", [["train", "RECIPE"], ["runs"], ["compare"], ["prune", "--frac", "0.3"]])
def test_an_empty_runs_dir_is_refused_not_read_as_this_folder(tmp_path, monkeypatch, command):
    recipe = write_recipe(tmp_path, TINY)
    monkeypatch.chdir(tmp_path)
    res = cli(*[str(recipe) if a == "RECIPE" else a for a in command], "--runs-dir", "")
    assert res.exit_code == 2 and "--runs-dir is empty; expected a folder" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_force_on_a_run_that_is_a_link_replaces_the_link_and_leaves_its_folder(tmp_path, runs):
    recipe = write_recipe(tmp_path, TINY)
    elsewhere = tmp_path / "elsewhere"
    assert cli("train", recipe, "--name", "kept", "--runs-dir", elsewhere, "-q").exit_code == 0
    runs.mkdir(parents=True)
    (runs / "linked").symlink_to(elsewhere / "kept")
    res = cli("train", recipe, "--name", "linked", "--force", "-q")
    assert res.exit_code == 0, res.output
    assert (runs / "linked").is_dir() and not (runs / "linked").is_symlink()
    assert [p.name for p in runs.iterdir()] == ["linked"]  # nothing left beside it
    assert (elsewhere / "kept" / "values.parquet").is_file()


@pytest.mark.parametrize("command", ["train", "runs", "attribute", "prune", "bench", "compare"])
def test_help_reflows_each_paragraph_and_keeps_every_word(command, monkeypatch):
    """A command's description is reflowed to the terminal (not broken where the docstring's lines
    end), and no word of it is lost to markup (such as ``<method>`` read as a tag)."""
    from adamshap_cli.main import app

    monkeypatch.setenv("COLUMNS", "80")
    res = cli(command, "--help")
    assert res.exit_code == 0, res.output
    doc = next(c for c in app.registered_commands if c.name == command).callback.__doc__
    words = doc.replace("`", "").split()
    shown = res.output.split()
    at = 0
    for word in words:  # in order
        assert word in shown[at:], f"{command} --help lost {word!r}"
        at = shown.index(word, at) + 1
    description = res.output.split("╭")[0].splitlines()
    for line, after in itertools.pairwise(description):
        if after.strip() and line.strip():  # the next line's first word did not fit on this one
            width = len(line.rstrip()) + 1 + len(after.split()[0])
            assert width > 78, f"{command} --help breaks a paragraph early: {line!r}"


def test_a_fast_mode_run_says_how_often_it_reused_and_what_its_checks_found():
    from adamshap_cli.train import fast_mode_line

    nan = float("nan")
    checks = [nan, 0.999, nan, nan, 0.975]
    steps = pd.DataFrame({"val_loss": [0.5, 0.4, nan, nan, 0.3], "reuse_pearson": checks})
    line = fast_mode_line(steps)
    assert line.startswith("fast mode: ∇val reused on 2 of 5 steps; 2 checks of reuse found a Pearson")
    assert "0.975 at the lowest (median 0.987)" in line
    assert fast_mode_line(steps.assign(reuse_pearson=nan)) == "fast mode: ∇val reused on 2 of 5 steps"


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["prune", "--frac", "0.3,,0.2"], "'--frac 0.3,,0.2' has an empty item"),
        (["prune", "--frac", "0.3", "--by", "adam,"], "'--by adam,' has an empty item"),
        (
            ["bench", "--methods", "adam", "--methods", "sgd,"],
            "'--methods adam --methods sgd,' has an empty item",
        ),
    ],
    ids=["frac", "by", "methods"],
)
def test_an_empty_item_in_a_list_option_is_refused_not_dropped(command, said, runs):
    res = cli(*command, "--quiet")
    assert res.exit_code == 2 and said in " ".join(res.stderr.split()), res.output
    assert not runs.exists()


def test_the_training_bar_shows_a_dash_before_the_first_step(monkeypatch):
    """Run reports before its first step with a NaN loss and no speed: the bar says "–", not "nan"."""
    from adamshap_cli import common
    from adamshap_cli.train import _training_bar
    from rich.console import Console

    def drawn(*reports) -> str:  # the bar as it is left on the console after these reports
        console = Console(record=True, width=120)
        monkeypatch.setattr(common, "err_console", console)
        with _training_bar(quiet=False) as on_progress:
            for report in reports:
                on_progress(*report)
        return console.export_text()

    first = drawn((0, 10, float("nan"), 0.0))
    assert "loss – " in first and "– ex/s" in first and "nan" not in first.lower()
    later = drawn((0, 10, float("nan"), 0.0), (1, 10, 2.3456, 1234.0))
    assert "loss 2.3456" in later and "1,234 ex/s" in later


@pytest.mark.parametrize("columns, width", [(None, 200), ("100", 100)])
def test_output_to_a_file_is_laid_out_wide_unless_columns_says_otherwise(columns, width):
    """Rich lays out for 80 columns off a terminal: a `make bench` log's summary table came out folded."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
    code = "from adamshap_cli.common import console, err_console; print(console.width, err_console.width)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [str(width)] * 2


def test_a_progress_bar_written_to_a_file_prints_its_lines_every_log_seconds():
    """rich redraws a bar on a terminal only: a long run's log (a file, a pipe, a job scheduler's
    output) showed nothing until the command ended. There the bar's lines come every LOG_SECONDS."""
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from cli import common

    def steps_logged(terminal: bool) -> list[str]:
        out, now = io.StringIO(), [0.0]
        console = Console(file=out, width=60, force_terminal=terminal)
        columns = (TextColumn("step {task.completed}/{task.total}"),)
        bar = common._logged_progress()(
            *columns, console=console, get_time=lambda: now[0], auto_refresh=False
        )
        task = bar.add_task("train", total=100)
        for step, seconds in [(1, 0.0), (2, 10.0), (3, 31.0), (4, 40.0), (5, 60.0), (6, 61.0)]:
            now[0] = seconds
            bar.update(task, completed=step)
        return [line for line in out.getvalue().splitlines() if "step" in line]

    assert common.LOG_SECONDS == 30.0
    assert steps_logged(terminal=False) == ["step 1/100", "step 3/100", "step 6/100"]
    assert steps_logged(terminal=True) == []  # a terminal's bar is rich's own live display


def test_a_logged_progress_bar_prints_on_advance_and_when_a_phase_begins():
    """attribute moves its bar with advance (which rich does not route through update), and train's
    evaluation after the last step is a new description, shown in a log at once."""
    import io

    from rich.console import Console
    from rich.progress import TextColumn

    from cli import common

    out, now = io.StringIO(), [0.0]
    columns = (TextColumn("{task.description} {task.completed}/{task.total}"),)
    bar = common._logged_progress()(*columns, console=Console(file=out, width=60), get_time=lambda: now[0])
    task = bar.add_task("replay", total=10)
    bar.advance(task)  # the first: printed
    now[0] = 5.0
    bar.advance(task)  # 5 s later: not yet
    bar.update(task, description="replay: evaluating")  # a new phase: printed at once
    now[0] = 40.0
    bar.advance(task)  # 35 s after the last line
    bar.update(task, description="replay", log=False)  # as train's bar before its stop prints the last line
    lines = [line.strip() for line in out.getvalue().splitlines() if line.strip()]
    assert lines == ["replay 1/10", "replay: evaluating 2/10", "replay: evaluating 3/10"]


def test_a_language_model_valued_against_more_positions_than_two_batches_gets_a_note():
    """On a language model the validation target's forward and backward were most of a valued step
    (200 texts against a batch of 64: 658 of 954 ms), and train said nothing of it."""
    from helpers import tiny, tiny_gpt

    from adamshap_core.recipe import recipe_from_dict
    from adamshap_core.train import prepare
    from cli import train as cli_train
    from cli.train import validation_cost_note

    def note(recipe, size=0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cli_train, "VALIDATION_SIZE_NOTED", size)
            return validation_cost_note(prepare(recipe_from_dict(recipe)))

    assert note(tiny_gpt(train={"batch_size": 1}), size=10**8) is None  # small: the whole step is
    assert note(tiny_gpt(train={"batch_size": 1}, attribution={"fast": True})) is None  # advice taken
    assert note(tiny_gpt(train={"batch_size": 1})) == (
        "the validation target (6 texts) holds 6.0 times the positions of a training batch (1 text), so "
        "computing its gradient takes most of each valued step; attribution.val_batch: N values against its "
        "first N texts, and attribution.fast reuses the gradient while it stays close (README: Fast mode)."
    )
    assert note(tiny_gpt(train={"batch_size": 3})) is None  # twice a batch: no note
    assert note(tiny_gpt(train={"batch_size": 1}, attribution={"val_batch": 2})) is None
    assert note(tiny_gpt(train={"batch_size": 1}, attribution={"enabled": False})) is None
    assert note(tiny(train={"batch_size": 1})) is None  # a table's rows cost little
