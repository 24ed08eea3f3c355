"""Replays: training is deterministic on the CPU, and a replay against other validation targets
walks the very same trajectory (parameters bitwise equal at the end)."""

import numpy as np
import pytest
import torch
from helpers import facts_gpt, threads_of_runs

from adamshap_core.attribute import replay_recipe, replay_values
from adamshap_core.recipe import recipe_from_dict
from adamshap_core.train import train

RECIPE = facts_gpt(name="replay", train={"epochs": 2})


@pytest.fixture(scope="module")
def run():
    recipe = recipe_from_dict(RECIPE)
    return recipe, train(recipe)


def test_training_is_deterministic(run):
    recipe, first = run
    again = train(recipe)
    assert again.metrics["params_sha256"] == first.metrics["params_sha256"]
    for m in first.methods:
        assert np.array_equal(again.values[m], first.values[m])


def test_replay_against_queries_ends_with_the_runs_parameters(run):
    recipe, result = run
    data = result.data
    qx, qy = data.x_val, data.y_val  # the run's own validation rows, each as its own target
    replay = replay_values(
        recipe, data, qx, qy, ["adam", "sgd"], expected_sha256=result.metrics["params_sha256"]
    )
    assert replay.matches_run is True
    original, replayed = result.model.state_dict(), replay.model.state_dict()
    assert original.keys() == replayed.keys()
    assert all(torch.equal(original[k], replayed[k]) for k in original)
    for m in ("adam", "sgd"):
        assert replay.values[m].shape == (data.n_train, len(qy))
        # values are linear in the validation gradient: the mean over the targets is the value
        # against their mean loss, which is what the run valued against
        np.testing.assert_allclose(replay.values[m].mean(axis=1), result.values[m], rtol=1e-4, atol=1e-7)


def test_chunked_replays_give_the_same_values(run):
    recipe, result = run
    data = result.data
    qx, qy = data.x_val[:5], data.y_val[:5]
    whole = replay_values(recipe, data, qx, qy, ["adam"])
    chunked = replay_values(recipe, data, qx, qy, ["adam"], chunk=2)
    assert chunked.replays == 3 and whole.replays == 1
    assert chunked.params_sha256 == whole.params_sha256 == result.metrics["params_sha256"]
    np.testing.assert_allclose(chunked.values["adam"], whole.values["adam"], rtol=1e-5, atol=1e-9)


def test_a_replay_never_fuses_its_queries_into_the_batch():
    """Fused rows round the update otherwise: the replay must walk plain training's trajectory."""
    fused = recipe_from_dict({**RECIPE, "attribution": {**RECIPE["attribution"], "fuse_validation": True}})
    assert replay_recipe(fused, ["adam"]).attribution.fuse_validation is False


def test_a_query_replay_runs_with_the_thread_count_it_is_given(run, monkeypatch):
    """``threads``: the run's recorded intra-op thread count, which the replay takes and then restores."""
    from adamshap_core.threads import recorded_threads

    recipe, result = run
    assert recorded_threads(result.metrics) == torch.get_num_threads()
    assert [recorded_threads({"torch_threads": n}) for n in (None, True, 0, "2", 3)] == [None] * 4 + [3]
    seen = threads_of_runs(monkeypatch)
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    data = result.data
    replay_values(recipe, data, data.x_val[:2], data.y_val[:2], ["sgd"], threads=wanted)
    replay_values(recipe, data, data.x_val[:2], data.y_val[:2], ["sgd"])  # None: as they are
    assert seen == [wanted, before] and torch.get_num_threads() == before
