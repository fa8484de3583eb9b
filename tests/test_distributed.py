"""Vocabulary-parallel losses (``process_group=``), DTensor logits and FSDP2 LM heads, on gloo processes on the CPU:
each rank's loss and gradient slice against the float64 reference of the whole rows and the one-process loss.

The checks live in ``distributed_checks.py`` and run in one spawn of 2 processes and one of 3 (uneven shards,
one of a single column); each check is reported here as its own test. A spawn that outlives
``SPAWN_TIMEOUT_S`` is killed and its tests fail, naming the check each rank was in: nothing hangs CI.
"""
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_checks
import ttm_kernels

SPAWN_TIMEOUT_S = 150
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
needs_cpu_kernels = pytest.mark.skipif(not ttm_kernels.cpu_extension_available(), reason="C++ extension not built")


def run_spawned(world, names, folder):
    """Runs the checks ``names`` on ``world`` spawned ranks; {name: [traceback or None per rank]}."""
    context = mp.start_processes(distributed_checks.main, args=(world, str(folder / "store"), str(folder), names),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            where = {rank: (folder / f"rank{rank}.progress").read_text() for rank in range(world)
                     if (folder / f"rank{rank}.progress").exists()}
            pytest.fail(f"{world} ranks did not finish within {SPAWN_TIMEOUT_S} s; killed them in the checks {where}")
    results = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    return {name: [r[name] for r in results] for name in names}


def checks(prefix):
    names = [name for name in distributed_checks.CHECKS if name.startswith(prefix)]
    if not ttm_kernels.triton_available():
        names = [name for name in names if "triton" not in name]
    return names


_RUNS = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The results of every check on ``world`` ranks, from one spawn per world size."""
    def results(world):
        if world not in _RUNS:
            _RUNS[world] = run_spawned(world, checks(""), tmp_path_factory.mktemp(f"world{world}"))
        return _RUNS[world]
    return results


def assert_passed(results, name):
    failures = {rank: tb for rank, tb in enumerate(results[name]) if tb}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())


WORLDS = pytest.mark.parametrize("world", [2, 3], ids=["2-ranks", "3-ranks"])
pytestmark = [needs_gloo, needs_cpu_kernels]


@WORLDS
@pytest.mark.parametrize("check", checks(""))
def test_fused_losses_distributed(spawned, world, check):
    """One check of ``distributed_checks.CHECKS``, named after its entry point: fused_loss (process_group),
    error (disagreeing ranks), fused_linear (process_group), fsdp2 (LM heads of fully_shard-ed modules)."""
    assert_passed(spawned(world), check)


def test_fused_loss_process_group_without_init():
    """A process group without torch.distributed initialised is a clear error, before any work."""
    z = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ttm_kernels.fused_wttm_loss(z, z, process_group=object())


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@needs_gloo
@needs_cpu_kernels
def test_fused_losses_one_rank_group(one_rank_group):
    """A group of one holds whole rows: the one-process kernels, bit for bit."""
    z, v, target = (t.float() if t.is_floating_point() else t for t in distributed_checks.make_rows(seed=20))
    grads = []
    for group in (one_rank_group, None):
        student = z.clone().requires_grad_()
        loss = ttm_kernels.fused_wttm_loss(student, v, target, gamma=0.3, process_group=group)
        loss.backward()
        grads.append((loss, student.grad))
    hs, ws, _, ht, wt, _, target = (t.float() if t.is_floating_point() else t
                                    for t in distributed_checks.make_linear(seed=21))
    for group in (one_rank_group, None):
        hidden, weight = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = ttm_kernels.fused_linear_kd_loss(hidden, weight, ht, wt, target, process_group=group)
        loss.backward()
        grads.append((loss, hidden.grad, weight.grad))
    for ours, theirs in (grads[:2], grads[2:]):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
