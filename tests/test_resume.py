"""Checkpoint and resume: a stopped, interrupted or killed run, resumed, ends bit for bit where the
uninterrupted run ends (values, step tables, final parameters); resuming refuses what it cannot
continue exactly."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY, cli, tiny, write_recipe

from adamshap_core.checkpoint import Checkpointer, TrainingInterrupted
from adamshap_core.errors import UserError
from adamshap_core.interrupts import stop_on_interrupt
from adamshap_core.locks import run_lock
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.runio import CHECKPOINT_FILE
from adamshap_core.train import prepare, run

REPO = Path(__file__).resolve().parents[1]

# ~200 steps (iris: 100 training rows, batch 4, 8 epochs) with a checkpoint every 3 steps: long enough
# that a kill lands mid-run, short enough for the default suite.
LONG = tiny(
    name="long",
    train={"epochs": 8, "batch_size": 4, "checkpoint_every": 3, "checkpoint_seconds": 0},
    optim={"schedule": "cosine", "warmup_steps": 5},
    attribution={"methods": ["adam", "sgd"], "record_steps": 6},
)


def digest_run(run: Path) -> dict:
    """What must be equal between a resumed and an uninterrupted run (step timings aside)."""
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "values": pd.read_parquet(run / "values.parquet"),
        "steps": pd.read_parquet(run / "steps.parquet").drop(columns="seconds"),
        "steps_values": pd.read_parquet(run / "steps_values.parquet"),
        "params_sha256": metrics["params_sha256"],
        "status": metrics["status"],
        "steps_done": metrics["steps"],
    }


def assert_same_run(a: Path, b: Path) -> None:
    da, db = digest_run(a), digest_run(b)
    for key in ("values", "steps", "steps_values"):
        pd.testing.assert_frame_equal(da[key], db[key], check_exact=True)
    assert da["params_sha256"] == db["params_sha256"]
    assert da["status"] == db["status"] == "complete" and da["steps_done"] == db["steps_done"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run of LONG (in-process CLI)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root, LONG)
    res = cli("train", recipe, "--quiet", "--runs-dir", root / "runs", "--name", "ref")
    assert res.exit_code == 0, res.output
    run = root / "runs" / "ref"
    assert not (run / CHECKPOINT_FILE).exists()  # removed once the run completes
    return run


def start_subprocess(recipe: Path, runs: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "adamshap_cli", "train", str(recipe), "--quiet"]
    cmd += ["--runs-dir", str(runs), "--name", name]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (rc {proc.returncode}) before {path.name} appeared: {proc.stderr.read()}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {timeout}s")
        time.sleep(0.005)


# --------------------------------------------------------------------------- the acceptance test


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, reference):
    recipe = write_recipe(tmp_path, LONG)
    runs = tmp_path / "runs"
    proc = start_subprocess(recipe, runs, "cut")
    run = runs / "cut"
    wait_for(run / CHECKPOINT_FILE, proc)
    # frozen within a poll of its first checkpoint (however fast the machine: a sleep here would let
    # a fast one finish the run first), then killed
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / "metrics.json").read_text())["status"] == "incomplete"
    assert not (run / "values.parquet").exists()
    killed_at = torch.load(run / CHECKPOINT_FILE, weights_only=True)["loop"]["step"]

    res = cli("train", "--resume", "cut", "--runs-dir", runs, "--quiet")
    assert res.exit_code == 0, res.output
    assert_same_run(run, reference)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] == [killed_at] and 0 < killed_at < metrics["total_steps"]
    assert sorted(os.listdir(run)) == sorted(
        ["recipe.yaml", "metrics.json", "values.parquet", "steps.parquet", "steps_values.parquet"]
    )


@pytest.mark.slow  # a real SIGINT to a subprocess; the fast tests below drive the same path in-process
def test_ctrl_c_stops_after_the_step_saves_and_says_how_to_resume(tmp_path, reference):
    recipe = write_recipe(tmp_path, LONG)
    runs = tmp_path / "runs"
    proc = start_subprocess(recipe, runs, "stopped")
    run = runs / "stopped"
    wait_for(run / CHECKPOINT_FILE, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    assert f"adamshap train --resume stopped --runs-dir {runs}" in flat and "stopped after step" in flat
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "incomplete" and "interrupted after step" in metrics["error"]
    stopped_at = torch.load(run / CHECKPOINT_FILE, weights_only=True)["loop"]["step"]
    assert f"after step {stopped_at} of" in flat  # the checkpoint is the step it stopped after

    res = cli("train", "--resume", "stopped", "--runs-dir", runs, "--quiet")
    assert res.exit_code == 0, res.output
    assert_same_run(run, reference)


def test_sigterm_sets_the_stop_flag_too_and_a_second_one_terminates():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop() and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one ends the process
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigterm_mid_training_exits_143_with_a_checkpoint(tmp_path, monkeypatch):
    """The CLI path of a stop by SIGTERM: the step finishes, a checkpoint is saved, exit 143."""
    from adamshap_core import interrupts

    class TerminatedAtSecondPoll(interrupts.StopFlag):
        polls = 0

        def __call__(self) -> bool:
            self.polls += 1
            if self.polls == 2:
                self.set(signal.SIGTERM)  # as the handler does
            return super().__call__()

    monkeypatch.setattr(
        interrupts, "stop_on_interrupt", lambda: contextlib.nullcontext(TerminatedAtSecondPoll())
    )
    res = cli("train", write_recipe(tmp_path, LONG), "--name", "t", "--runs-dir", tmp_path / "runs", "-q")
    assert res.exit_code == 143, res.output
    assert (tmp_path / "runs" / "t" / CHECKPOINT_FILE).is_file() and "stopped after step 2" in res.output


def test_ctrl_c_during_the_final_writes_lets_them_finish_and_the_run_is_complete(tmp_path, monkeypatch):
    """After the last step there is nothing to resume: the first Ctrl-C waits for the run's tables and
    metrics.json (milliseconds), where it used to leave the finished run incomplete."""
    from adamshap_core import runio

    real = runio.finish_run

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, in the main thread
        return real(*args)

    monkeypatch.setattr(runio, "finish_run", interrupted)
    res = cli("train", write_recipe(tmp_path, TINY), "--runs-dir", tmp_path / "runs", "-q")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "complete"
    assert not (run_dir / CHECKPOINT_FILE).exists()


def test_memory_short_after_the_last_step_is_resumed_without_its_steps(tmp_path, monkeypatch):
    """The evaluation after the last step runs in chunks of the training batch; where it still runs
    out of memory, the run is incomplete with a checkpoint of its last step, and ``--resume``
    only evaluates: the values are those of an uninterrupted run."""
    from adamshap_core import train

    real, chunks = train.evaluate, []

    def short_of_memory(model, x, y, loss_fn, batch):
        chunks.append(batch)
        if len(chunks) == 3:  # the test split
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 68164 bytes")
        return real(model, x, y, loss_fn, batch)

    recipe = write_recipe(tmp_path, TINY)
    cli("train", recipe, "--runs-dir", tmp_path / "whole", "-q")
    monkeypatch.setattr(train, "evaluate", short_of_memory)
    res = cli("train", recipe, "--runs-dir", tmp_path / "runs", "-q")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    said = " ".join(res.stderr.split())
    assert "out of memory on cpu evaluating the test split after the last step" in said
    assert f"in chunks of train.batch_size ({TINY['train']['batch_size']}) rows" in said
    assert "resume from the last checkpoint with: adamshap train --resume tiny" in said
    assert chunks == [TINY["train"]["batch_size"]] * 3
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "incomplete"
    monkeypatch.setattr(train, "evaluate", real)
    monkeypatch.setattr(train, "_take_step", lambda *a: pytest.fail("a step was taken again"))
    res = cli("train", "--resume", "tiny", "--runs-dir", tmp_path / "runs", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "complete"
    whole = pd.read_parquet(tmp_path / "whole" / "tiny" / "values.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "values.parquet"), whole)


def test_first_ctrl_c_sets_the_stop_flag_and_a_second_aborts():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_interrupt() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------- the loop, in-process


def stop_after(k: int):
    """A stop flag that turns true at its k-th poll, i.e. after the k-th step of this process."""
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= k

    return stop


def train_in_segments(recipe, path: Path, stops: list[int]):
    """Train ``recipe``, stopping after each step in ``stops`` and resuming from its checkpoint."""
    done = 0
    for at in stops:
        prep = prepare(recipe)
        with pytest.raises(TrainingInterrupted) as info:
            run(
                prep,
                checkpointer=Checkpointer(path, prep),
                resume=done > 0,
                stop=stop_after(at - done),
            )
        assert info.value.step == at
        done = at
    prep = prepare(recipe)
    reports = []
    result = run(
        prep, checkpointer=Checkpointer(path, prep), resume=True, on_progress=lambda *r: reports.append(r)
    )
    assert reports[0][0] == stops[-1] and reports[-1][0] == reports[0][1]  # a bar resumes where it stopped
    return result


@pytest.mark.parametrize(
    "sections",
    [
        {"train": {"epochs": 3, "batch_size": 7}, "optim": {"schedule": "linear", "warmup_steps": 4}},
        {
            "train": {"epochs": 2, "batch_size": 10, "grad_clip": 0.5},
            "optim": {"name": "adamw", "weight_decay": 0.1},
        },
        {"train": {"epochs": 2, "batch_size": 10}, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        {"train": {"epochs": 2, "batch_size": 16}, "attribution": {"enabled": False}},
        {
            "train": {"epochs": 2, "batch_size": 10},
            "attribution": {"fast": {"refresh_every": 3, "warmup": 1}},
        },
        {
            "train": {"epochs": 2, "batch_size": 10, "grad_clip": 0.5},
            "attribution": {"fuse_validation": True},
        },
    ],
    ids=["adam-linear-warmup", "adamw-clip", "sgd-momentum", "no-attribution", "fast-mode", "fused-rows"],
)
def test_stop_anywhere_and_resume_is_bitwise_equal(tmp_path, sections):
    """Stopping after the first step, the last step of an epoch, the first of the next, or several
    times in a row, then resuming, ends exactly where the uninterrupted run ends."""
    recipe = recipe_from_dict(tiny(**sections))
    full = run(prepare(recipe))
    per_epoch = full.total_steps // recipe.train.epochs
    for stops in ([1], [per_epoch], [per_epoch + 1], [2, 3, per_epoch - 1, per_epoch + 2]):
        res = train_in_segments(recipe, tmp_path / f"ck-{stops[0]}.pt", stops)
        assert res.steps_done == full.steps_done
        for m in full.methods:
            assert np.array_equal(full.values[m], res.values[m])
        assert np.array_equal(full.n_steps, res.n_steps)
        assert res.metrics["params_sha256"] == full.metrics["params_sha256"]
        assert res.metrics["resumed_at_steps"] == stops
        pd.testing.assert_frame_equal(full.steps.drop(columns="seconds"), res.steps.drop(columns="seconds"))
        pd.testing.assert_frame_equal(full.steps_values, res.steps_values)


def test_each_checkpoint_packs_only_the_steps_since_the_last_and_format_2_still_resumes(
    tmp_path, monkeypatch
):
    """The step rows are saved as one tensor, packed a save at a time: pickling every row's tuple at
    each save grew quadratically (63 ms a save at step 18,000). A checkpoint of format 2, whose step
    rows are a list and whose recipe lacks a key added since, resumes as before."""
    from adamshap_core import checkpoint, run_tables

    recipe = recipe_from_dict(
        tiny(train={"epochs": 2, "batch_size": 10, "checkpoint_every": 3, "checkpoint_seconds": 0})
    )
    full = run(prepare(recipe))
    packed, real = [], checkpoint._packed
    monkeypatch.setattr(checkpoint, "_packed", lambda rows: packed.append(len(rows)) or real(rows))
    path = tmp_path / "ck.pt"
    prep = prepare(recipe)
    with pytest.raises(TrainingInterrupted):
        run(prep, checkpointer=Checkpointer(path, prep), stop=stop_after(8))
    assert packed == [0, 3, 3, 2]  # at steps 3 and 6, and at the stop after step 8
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == 3 and blob["loop"]["step_rows"].shape == (8, len(run_tables.STEP_COLUMNS))
    blob["format"], blob["loop"]["step_rows"] = 2, checkpoint.unpack_steps(blob["loop"]["step_rows"])
    del blob["recipe"]["data"]["max_words"]  # a key added since: it takes its default
    torch.save(blob, path)
    prep = prepare(recipe)
    res = run(prep, checkpointer=Checkpointer(path, prep), resume=True)
    assert res.metrics["params_sha256"] == full.metrics["params_sha256"]
    pd.testing.assert_frame_equal(full.steps.drop(columns="seconds"), res.steps.drop(columns="seconds"))
    for m in full.methods:
        assert np.array_equal(full.values[m], res.values[m])


def test_gpt_with_dropout_resumes_bitwise_equal(tmp_path):
    """Dropout draws from torch's global RNG at every step (training and validation passes), so
    this fails unless the checkpoint restores that RNG exactly."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"the {a} fox saw the {b} dog" for a, b in zip("abcdefghijklmn", "opqrstuvwxyzab", strict=True)
        )
    )
    recipe = recipe_from_dict(
        tiny(
            data={"source": f"text:{corpus}", "val_size": 2, "test_size": 2, "label_noise": 0},
            model={"kind": "gpt", "n_layer": 1, "d_model": 8, "n_head": 2, "dropout": 0.3},
            train={"epochs": 2, "batch_size": 3},
        )
    )
    full = run(prepare(recipe))
    res = train_in_segments(recipe, tmp_path / CHECKPOINT_FILE, [2, 5])
    assert res.metrics["params_sha256"] == full.metrics["params_sha256"]
    for m in full.methods:
        assert np.array_equal(full.values[m], res.values[m])


def test_periodic_checkpoints_follow_checkpoint_every(tmp_path):
    recipe = recipe_from_dict(tiny(train={"epochs": 2, "checkpoint_every": 4, "checkpoint_seconds": 0}))
    prep = prepare(recipe)
    saved = []
    ck = Checkpointer(tmp_path / CHECKPOINT_FILE, prep)
    original = ck.save
    ck.save = lambda state, gen, wall: (saved.append(state.step), original(state, gen, wall))
    res = run(prep, checkpointer=ck)
    # and after the last step (14), so that a failure in the evaluation after it costs no step
    assert saved == [*range(4, res.total_steps, 4), res.total_steps] and res.total_steps % 4

    off = prepare(recipe_from_dict(tiny(train={"epochs": 2, "checkpoint_every": 0})))
    ck_off = Checkpointer(tmp_path / "off.pt", off)
    run(off, checkpointer=ck_off)
    assert not ck_off.exists()


def test_periodic_checkpoints_wait_for_checkpoint_seconds(tmp_path, monkeypatch):
    """Every checkpoint holds each example's values: on a large training split, one every 200 steps
    wrote 834 MB over a 14 s run of 1M rows. A periodic one waits until checkpoint_seconds have
    passed since the run started or last saved; the last step's and a stop's do not wait."""
    from adamshap_core import checkpoint

    clock = iter(range(0, 10_000, 10))  # each reading of the clock 10 s after the one before
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: next(clock))
    recipe = recipe_from_dict(tiny(train={"epochs": 2, "checkpoint_every": 2, "checkpoint_seconds": 25}))
    prep = prepare(recipe)
    saved = []
    ck = Checkpointer(tmp_path / CHECKPOINT_FILE, prep)  # the clock's first reading: 0 s
    original = ck.save
    ck.save = lambda state, gen, wall: (saved.append(state.step), original(state, gen, wall))
    res = run(prep, checkpointer=ck)
    # asked at steps 2 (10 s), 4 (20 s), 6 (30 s: saved, then 40 s), 8 (50 s), 10 (60 s), 12 (70 s: saved)
    assert saved == [6, 12, res.total_steps] and res.total_steps == 14
    assert recipe_from_dict(tiny()).train.checkpoint_seconds == 60.0  # the default


# --------------------------------------------------------------------------- what resume refuses


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A CLI run of the tiny recipe stopped after its first step as Ctrl-C stops it (exit 130)."""
    from adamshap_core import interrupts

    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, tiny(train={"epochs": 2}))
    with monkeypatch.context() as m:  # a Ctrl-C already pressed: stop after the first step
        m.setattr(interrupts, "stop_on_interrupt", lambda: contextlib.nullcontext(lambda: True))
        res = cli("train", recipe, "--quiet", "--runs-dir", runs)
    assert res.exit_code == 130, res.output
    assert "--resume tiny" in " ".join(res.output.split())
    assert (runs / "tiny" / CHECKPOINT_FILE).exists()
    return runs


def resume(runs: Path, *extra):
    return cli("train", "--resume", "tiny", "--runs-dir", runs, "--quiet", *extra)


def start_over(refused, runs: Path) -> None:
    """Run the command that a refusal to resume gives for training the run again (``train`` with the
    run's recipe and --force, as --resume refuses --force), and check that it completes the run."""
    command = " ".join(refused.output.split()).split(" with: ")[-1]
    args = shlex.split(command)
    assert args[:2] == ["adamshap", "train"] and "--resume" not in args, command
    assert args[2:] == [
        str(runs / "tiny" / "recipe.yaml"),
        "--name",
        "tiny",
        "--force",
        "--runs-dir",
        str(runs),
    ]
    again = cli(*args[1:], "--quiet")
    assert again.exit_code == 0, again.output
    assert json.loads((runs / "tiny" / "metrics.json").read_text())["status"] == "complete"


def test_resume_after_ctrl_c_in_process(stopped, tmp_path):
    res = resume(stopped)
    assert res.exit_code == 0, res.output
    ref = cli(
        "train",
        write_recipe(tmp_path, tiny(train={"epochs": 2})),
        "-q",
        "--runs-dir",
        stopped,
        "--name",
        "ref",
    )
    assert ref.exit_code == 0
    assert_same_run(stopped / "tiny", stopped / "ref")
    assert json.loads((stopped / "tiny" / "metrics.json").read_text())["resumed_at_steps"] == [1]


def test_a_resume_trains_with_the_runs_thread_count_whatever_the_shell_sets(stopped, monkeypatch):
    """The thread count orders a product's additions: a run started with one thread and resumed from a
    shell of four left the uninterrupted run's trajectory, and its metrics then named the four, which a
    replay would take for the whole run. The resume takes the count the run started with."""
    from adamshap_core import train as train_module

    started = json.loads((stopped / "tiny" / "metrics.json").read_text())["torch_threads"]
    seen, real = [], train_module.run
    counted = lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(train_module, "run", counted)
    before = torch.get_num_threads()
    torch.set_num_threads(started + 1)
    try:
        assert resume(stopped).exit_code == 0
        assert torch.get_num_threads() == started + 1  # the shell's count, given back
    finally:
        torch.set_num_threads(before)
    assert seen == [started]
    assert json.loads((stopped / "tiny" / "metrics.json").read_text())["torch_threads"] == started


def test_a_resumed_run_stopped_again_records_the_new_stop(stopped, monkeypatch):
    from adamshap_core import interrupts

    first = json.loads((stopped / "tiny" / "metrics.json").read_text())
    with monkeypatch.context() as m:  # Ctrl-C pressed again: stop after the first resumed step
        m.setattr(interrupts, "stop_on_interrupt", lambda: contextlib.nullcontext(lambda: True))
        res = resume(stopped)
    assert res.exit_code == 130 and "--resume tiny" in " ".join(res.output.split()), res.output
    again = json.loads((stopped / "tiny" / "metrics.json").read_text())
    assert first["error"] == "training interrupted after step 1 of 14"
    assert again["error"] == "training interrupted after step 2 of 14"
    assert resume(stopped).exit_code == 0


def test_a_resumed_runs_wall_time_counts_the_time_before_the_stop(stopped):
    path = stopped / "tiny" / CHECKPOINT_FILE
    blob = torch.load(path, weights_only=True)
    blob["loop"]["wall_seconds"] = 1000.0  # as if the steps before the stop had taken that long
    torch.save(blob, path)
    assert resume(stopped).exit_code == 0
    assert json.loads((stopped / "tiny" / "metrics.json").read_text())["wall_seconds"] >= 1000.0


def test_resume_refuses_a_complete_run(tmp_path):
    runs = tmp_path / "runs"
    cli("train", write_recipe(tmp_path, tiny()), "--quiet", "--runs-dir", runs)
    res = resume(runs)
    assert res.exit_code == 2 and "already complete" in res.output


def test_resume_refuses_a_run_without_checkpoint(stopped):
    os.unlink(stopped / "tiny" / CHECKPOINT_FILE)
    res = resume(stopped)
    assert res.exit_code == 2 and "has no checkpoint" in res.output
    start_over(res, stopped)


def test_resume_refuses_recipe_options(stopped, tmp_path):
    for extra in (["--set", "optim.lr=0.1"], ["--name", "x"], ["--force"]):
        res = resume(stopped, *extra)
        assert res.exit_code == 2 and extra[0] in res.output
    res = cli("train", write_recipe(tmp_path, tiny()), "--resume", "tiny", "--runs-dir", stopped)
    assert res.exit_code == 2 and "RECIPE" in res.output


def test_resume_refuses_an_edited_recipe(stopped):
    p = stopped / "tiny" / "recipe.yaml"
    p.write_text(p.read_text().replace("lr: 0.01", "lr: 0.02"))
    record = (stopped / "tiny" / "metrics.json").read_text()
    res = resume(stopped)
    assert res.exit_code == 2 and "different recipe" in res.output, res.output
    assert (stopped / "tiny" / "metrics.json").read_text() == record  # why it stopped, as it was
    start_over(res, stopped)  # with the edited recipe
    assert "lr: 0.02" in p.read_text()


def test_resume_refuses_changed_training_data(tmp_path):
    def write_data(power: int) -> None:  # power 1 or 2: every row's first feature changes
        rows = [f"{(i % 7) ** power},{(i * 3) % 5},{i % 2}" for i in range(80)]
        data.write_text("\n".join(["a,b,y", *rows]) + "\n")

    data = tmp_path / "d.csv"
    write_data(1)
    recipe = recipe_from_dict(
        tiny(data={"source": f"csv:{data}", "target": "y", "val_size": 10, "test_size": 10, "label_noise": 0})
    )
    prep = prepare(recipe)
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(TrainingInterrupted):
        run(prep, checkpointer=Checkpointer(path, prep), stop=stop_after(1))
    write_data(2)
    again = prepare(recipe)
    with pytest.raises(UserError, match="different training data"):
        run(again, checkpointer=Checkpointer(path, again), resume=True)


def test_resume_refuses_changed_validation_or_test_data(tmp_path):
    """The training split as it was, the held-out rows changed: the rest of the run would value against
    another validation split (and test on another test split) than its first steps did."""
    recipe = recipe_from_dict(tiny())
    prep = prepare(recipe)
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(TrainingInterrupted):
        run(prep, checkpointer=Checkpointer(path, prep), stop=stop_after(1))
    for part in ("x_val", "y_test"):
        again = prepare(recipe)
        changed = getattr(again.data, part).clone()
        changed[0] = changed[0] + 1
        setattr(again.data, part, changed)
        with pytest.raises(UserError, match="different validation or test data"):
            run(again, checkpointer=Checkpointer(path, again), resume=True)
    blob = torch.load(path, weights_only=True)
    del blob["held_out_sha256"]  # as a checkpoint written before the digest was recorded
    torch.save(blob, path)
    older = prepare(recipe)
    run(older, checkpointer=Checkpointer(path, older), resume=True)  # resumes: nothing to check it by


@pytest.mark.parametrize("part", ["x_train", "y_train", "example_id"])
def test_the_data_digest_covers_inputs_labels_and_ids(part):
    """Any of them changed (the labels alone, say), and a resume is refused as other training data."""
    from adamshap_core.digests import data_digest

    data = prepare(recipe_from_dict(tiny(attribution={"enabled": False}))).data
    before = data_digest(data)
    changed = getattr(data, part).clone()
    changed[0] = changed[0] + 1
    setattr(data, part, changed)
    assert data_digest(data) != before


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _foreign(p: Path) -> None:
    torch.save([1, 2, 3], p)


def _other_format(p: Path) -> None:
    blob = torch.load(p, weights_only=True)
    torch.save({**blob, "format": 999}, p)


def test_digests_hash_the_tensors_bytes_in_place_as_the_copies_they_replace():
    """The digests read each tensor's bytes through a view, where a copy of a large split cost its size;
    the digests recorded by earlier runs (of the copied bytes) still match."""
    import hashlib

    from adamshap_core.digests import _digest

    tensors = (
        torch.randn(5, 3),
        torch.arange(7),
        torch.tensor([True, False]),
        torch.randn(4).bfloat16(),
        torch.randn(6, 4).t(),
    )
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert _digest(tensors) == h.hexdigest()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate, "cannot be read"),
        (_foreign, "is not an adamshap checkpoint"),
        (_other_format, "format 999"),
    ],
    ids=["truncated", "foreign", "other-format"],
)
def test_resume_refuses_a_damaged_checkpoint(stopped, damage, says):
    """Refused, with the command that trains the run again; the run's record of why it stopped (a
    Ctrl-C) stays as it was, since the refusal changed nothing."""
    damage(stopped / "tiny" / CHECKPOINT_FILE)
    record = json.loads((stopped / "tiny" / "metrics.json").read_text())
    assert record["status"] == "incomplete" and "interrupted" in record["error"]
    res = resume(stopped)
    assert res.exit_code == 2 and says in " ".join(res.output.split()) and "Traceback" not in res.output
    assert json.loads((stopped / "tiny" / "metrics.json").read_text()) == record
    start_over(res, stopped)


@pytest.mark.parametrize("where", ["opening-line", "writing-the-run"])
def test_ctrl_c_before_training_starts_leaves_no_run_folder(tmp_path, monkeypatch, where):
    """Stopped after the run's folder was made but before its training started: nothing was trained,
    so nothing is kept, and the same command then trains the run."""
    from adamshap_cli import train as train_cli

    from adamshap_core import runio

    def pressed(*args, **kwargs):
        if where == "writing-the-run":
            args[0].write_recipe(args[1])  # half-way: the recipe written, metrics.json not yet
        raise KeyboardInterrupt

    runs, recipe = tmp_path / "runs", write_recipe(tmp_path, tiny())
    owner, name = (train_cli, "_print_opening") if where == "opening-line" else (runio, "start_run")
    with monkeypatch.context() as m:
        m.setattr(owner, name, pressed)
        res = cli("train", recipe, "--runs-dir", runs)
    assert res.exit_code == 130 and "stopped" in res.output
    assert not (runs / "tiny").exists()
    assert cli("train", recipe, "--quiet", "--runs-dir", runs).exit_code == 0


def test_a_new_run_that_cannot_lock_its_folder_leaves_it_to_the_process_holding_it(tmp_path, monkeypatch):
    """Another ``train --force`` replaced the folder just made, and locked it first: its folder."""
    from adamshap_core import runio

    runs = tmp_path / "runs"
    theirs = runs / "tiny"
    theirs.mkdir(parents=True)
    monkeypatch.setattr(runio, "refuse_taken", lambda root, name, force: None)  # free when asked
    monkeypatch.setattr(runio, "create_run_dir", lambda root, name, force: theirs)  # theirs when made
    with run_lock(theirs):
        res = cli("train", write_recipe(tmp_path, tiny()), "--quiet", "--runs-dir", runs)
        assert res.exit_code == 2 and "being written by" in res.output
        assert theirs.is_dir()


def test_resume_refuses_while_another_process_writes_the_run(stopped):
    with run_lock(stopped / "tiny"):
        res = resume(stopped)
    assert res.exit_code == 2 and "being written by process" in res.output
    assert resume(stopped).exit_code == 0  # once the lock is gone


@pytest.mark.parametrize("doing", ["train", "prune"])
def test_force_refuses_to_replace_a_run_being_written(stopped, tmp_path, doing):
    recipe = write_recipe(tmp_path, tiny())
    with run_lock(stopped / "tiny", doing):
        res = cli("train", recipe, "--quiet", "--runs-dir", stopped, "--force")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and f"is being written by process {os.getpid()} (adamshap {doing})" in said
    assert (stopped / "tiny" / CHECKPOINT_FILE).exists()


def test_resume_removes_half_written_files_of_the_killed_process(stopped):
    run_dir = stopped / "tiny"
    for stale in (".checkpoint.pt.k1l2e3d.tmp", ".values.parquet.x9y8z7.tmp"):
        (run_dir / stale).write_bytes(b"half")
    assert resume(stopped).exit_code == 0
    assert not list(run_dir.glob(".*"))


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A disk that fills up mid-save: the run fails, the last good checkpoint stays, and resuming
    from it still ends exactly where the uninterrupted run ends."""
    from adamshap_core import checkpoint

    recipe = recipe_from_dict(tiny(train={"epochs": 2, "checkpoint_every": 2, "checkpoint_seconds": 0}))
    full = run(prepare(recipe))
    path = tmp_path / CHECKPOINT_FILE
    real_save, calls = torch.save, {"n": 0}

    def save_then_fail(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    prep = prepare(recipe)
    with monkeypatch.context() as m:
        m.setattr(checkpoint.torch, "save", save_then_fail)
        with pytest.raises(OSError, match="No space left") as info:
            run(prep, checkpointer=Checkpointer(path, prep))
    assert info.value.filename == str(path)  # the message names the file it could not write
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]  # no temp file left
    assert torch.load(path, weights_only=True)["loop"]["step"] == 2
    again = prepare(recipe)
    res = run(again, checkpointer=Checkpointer(path, again), resume=True)
    assert res.metrics["params_sha256"] == full.metrics["params_sha256"]
    for m in full.methods:
        assert np.array_equal(full.values[m], res.values[m])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_torch_save_is_the_file_systems_error():
    """torch.save reports a failed write as a RuntimeError that names neither cause nor file; the
    checkpoint's writer raises the file system's own error instead (exit 2 with the path, in the CLI)."""
    from adamshap_core.checkpoint import save_tensors

    with pytest.raises(OSError) as info:
        save_tensors({"w": torch.zeros(1 << 16)}, "/dev/full")  # every write: no space left
    assert info.value.errno == 28


def test_tables_that_do_not_fit_leave_the_run_resumable_and_say_how(tmp_path, monkeypatch):
    """A disk that fills up while the finished run's tables are written: exit 2 with the file, the
    run marked incomplete with the error, and resuming once there is space completes it."""
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, tiny(train={"epochs": 2, "checkpoint_every": 2, "checkpoint_seconds": 0}))
    reference = cli("train", recipe, "--quiet", "--runs-dir", tmp_path / "reference")
    assert reference.exit_code == 0, reference.output

    def no_space(self, path, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", no_space)
        res = cli("train", recipe, "--quiet", "--runs-dir", runs)
    said = " ".join(res.output.split())
    assert res.exit_code == 2
    assert f"No space left on device ({runs / 'tiny' / 'values.parquet'})" in said
    assert "Once mended, resume from the last checkpoint with: adamshap train --resume tiny" in said
    assert "Traceback" not in res.output
    metrics = json.loads((runs / "tiny" / "metrics.json").read_text())
    assert metrics["status"] == "incomplete" and "No space left" in metrics["error"]
    assert resume(runs).exit_code == 0
    assert_same_run(runs / "tiny", tmp_path / "reference" / "tiny")


def test_a_run_that_fails_before_its_first_checkpoint_says_how_to_train_it_again(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    recipe = write_recipe(tmp_path, tiny(train={"epochs": 2, "checkpoint_every": 0}))

    def no_space(self, path, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", no_space)
        res = cli("train", recipe, "--quiet", "--runs-dir", runs)
    assert res.exit_code == 2 and "no checkpoint was written yet" in res.output, res.output
    start_over(res, runs)


def test_the_parameter_digest_covers_buffers():
    """params_sha256 ties a run to its model's whole state: a batch norm's running statistics too."""
    from adamshap_core.digests import params_digest

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    b = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    assert params_digest(a) == params_digest(b)
    b[1].running_mean.add_(1.0)
    assert params_digest(a) != params_digest(b)
