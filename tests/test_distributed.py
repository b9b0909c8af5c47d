"""Two gloo processes on CPU against one process computing on the concatenated batch (float64)."""

from __future__ import annotations

import pytest
import torch

from openalign import distributed
from tests.dist_worker import make_batch, pair_batch, run_step, spawn, worker

WORLD_SIZE, GLOBAL_BATCH = 2, 8
TOLERANCE = 1e-6  # relative, on the loss and on every gradient tensor


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # An absolute floor for gradients that are zero up to rounding (a bias feeding a training-mode BatchNorm).
    return float((actual - expected).norm() / max(float(expected.norm()), 1e-9))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    spawn(worker, WORLD_SIZE, (GLOBAL_BATCH, str(out_dir)), timeout_s=120)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def oracle(scenario: str) -> dict:
    """The single-process step on the whole global batch."""
    images, tokens = make_batch(GLOBAL_BATCH)
    num_shards = WORLD_SIZE if scenario == "bn_per_replica" else 1
    return run_step("align_local" if scenario == "gradcache" else scenario, images, tokens, num_shards)


def assert_matches_oracle(scenario: str, rank_results: list[dict]) -> None:
    expected = oracle(scenario)
    # The global loss is the mean of the ranks' local losses (equal local batches).
    mean_loss = sum(result[scenario]["loss"] for result in rank_results) / WORLD_SIZE
    assert relative_error(mean_loss, expected["loss"]) < TOLERANCE, (scenario, mean_loss, expected["loss"])
    for rank, result in enumerate(rank_results):
        grads = result[scenario]["grads"]
        assert grads.keys() == expected["grads"].keys() and len(grads) >= 7, (scenario, sorted(grads))
        for name, grad in grads.items():
            # Train-mode BatchNorm cancels the preceding bias: its true gradient is zero.
            cancelled = scenario.startswith("bn_") and name == "image_tower.0.bias"
            assert cancelled or expected["grads"][name].norm() > 1e-6, (scenario, name)
            error = relative_error(grad, expected["grads"][name])
            assert error < TOLERANCE, f"{scenario} rank {rank} {name}: relative error {error:.2e}"


@pytest.mark.parametrize("scenario", ["align_local", "align_global", "clip", "siglip", "gradcache", "rcl",
                                      "rince_weighted", "align_weighted_global"])
def test_loss_and_gradients_equal_single_process_on_concatenated_batch(scenario, rank_results):
    assert_matches_oracle(scenario, rank_results)


def test_per_replica_batchnorm_matches_per_shard_statistics(rank_results):
    # The oracle normalises each rank's slice with that slice's own statistics.
    assert_matches_oracle("bn_per_replica", rank_results)
    images, tokens = make_batch(GLOBAL_BATCH)
    for rank, result in enumerate(rank_results):
        shard = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        expected = run_step("bn_per_replica", images[shard], tokens[shard])
        for key in ("running_mean", "running_var"):
            error = relative_error(result["bn_per_replica"][key], expected[key])
            assert error < TOLERANCE, f"rank {rank} {key}: relative error {error:.2e}"
    # Per-replica statistics are not full-batch statistics: the full-batch step gives other gradients.
    full_batch = run_step("bn_per_replica", images, tokens)
    grad = rank_results[0]["bn_per_replica"]["grads"]["image_tower.0.weight"]
    assert relative_error(grad, full_batch["grads"]["image_tower.0.weight"]) > 1e-3


def test_synchronised_batchnorm_matches_full_batch_statistics(rank_results):
    # The oracle is plain training-mode BatchNorm on the concatenated batch.
    assert_matches_oracle("bn_synced", rank_results)
    expected = oracle("bn_synced")
    for rank, result in enumerate(rank_results):
        for key in ("running_mean", "running_var"):
            error = relative_error(result["bn_synced"][key], expected[key])
            assert error < TOLERANCE, f"rank {rank} {key}: relative error {error:.2e}"


def test_gather_without_grad_is_not_exact(rank_results):
    # Guards the oracle comparison: dropping other ranks' gradient terms must show up.
    expected = oracle("align_local")
    grad = rank_results[0]["align_gather_no_grad"]["grads"]["text_projection.weight"]
    assert relative_error(grad, expected["grads"]["text_projection.weight"]) > 1e-3


def test_fsdp2_on_gloo_cpu(rank_results):
    result = rank_results[0]["fsdp"]
    if "error" in result:
        pytest.skip(f"FSDP2 does not run on gloo/CPU here: {result['error'][:300]}")
    expected = oracle("align_local")
    mean_loss = sum(r["fsdp"]["loss"] for r in rank_results) / WORLD_SIZE
    assert relative_error(mean_loss, expected["loss"]) < TOLERANCE
    assert result["grads"].keys() == expected["grads"].keys()
    for name, grad in result["grads"].items():
        assert relative_error(grad, expected["grads"][name]) < TOLERANCE, name


def test_helpers_in_two_processes(rank_results):
    for rank, result in enumerate(rank_results):
        helpers = result["helpers"]
        assert helpers["world"] == (WORLD_SIZE, rank, rank)
        assert helpers["is_main"] == (rank == 0)
        assert helpers["broadcast"] == {"from": 0}
        assert "same batch size" in helpers["unequal_error"] and "[1, 2]" in helpers["unequal_error"]
        assert helpers["rank_and_world_size"] == (rank, WORLD_SIZE)
        # The collectives against the same reductions of every rank's input (rank + 1.5, rank, ...) in one process.
        assert helpers["objects"] == [{"rank": other} for other in range(WORLD_SIZE)]
        assert helpers["sum"] == sum(other + 1.5 for other in range(WORLD_SIZE))
        assert helpers["max"] == max(range(WORLD_SIZE))
        assert helpers["mean"] == sum(other + 1.5 for other in range(WORLD_SIZE)) / WORLD_SIZE
        assert helpers["any"] == (True, False)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert tuple(distributed.init_distributed())[:3] == (1, 0, 0)
    info = distributed.world_info()
    assert (info.world_size, info.rank) == (1, 0)
    assert distributed.is_main_process()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert (distributed.sum_over_ranks(2.5), distributed.max_over_ranks(2.5), distributed.mean_over_ranks(2.5)) == (
        2.5, 2.5, 2.5)
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.rank_and_world_size() == distributed.rank_and_world_size(from_environment=True) == (0, 1)
    # Without a process group, torchrun's variables count only where asked for (splitting work without one).
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.rank_and_world_size(from_environment=True) == (3, 4)
    assert distributed.rank_and_world_size() == (0, 1) and distributed.world_info().world_size == 1
    tensor = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(tensor) is tensor
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, "ddp") is model
    with pytest.raises(ValueError, match="'zero'"):
        distributed.wrap_model(model, "zero")
    # Converted BatchNorm keeps its parameters and is plain BatchNorm in one process.
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, eps=1e-3, momentum=0.2))
    weight = net[1].weight
    converted = distributed.wrap_model(net, "ddp", sync_batchnorm=True)
    assert isinstance(converted[1], distributed.CrossReplicaBatchNorm) and converted[1].weight is weight
    assert (converted[1].eps, converted[1].momentum) == (1e-3, 0.2)


def test_per_pair_estimates_are_the_same_on_every_rank_as_in_one_process(rank_results):
    from openalign.train.pair_estimates import PairEstimates

    oracle = PairEstimates(momentum=0.5, mixture_every=3)
    for step in range(1, 4):
        keys, probabilities = pair_batch(GLOBAL_BATCH, step)
        oracle.observe_step(keys, probabilities, epoch=step, step=step)
    expected = oracle.state_dict()
    assert expected["mixture"]["fitted_at_step"] == 3 and len(expected["hashes"]) == GLOBAL_BATCH
    for result in rank_results:
        state = result["pairs"]
        for name in ("slots", "hashes", "estimate", "visits", "epoch"):
            assert torch.equal(state[name], expected[name]), name
        assert state["mixture"] == expected["mixture"]
