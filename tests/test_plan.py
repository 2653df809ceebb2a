"""The plan of a run: units of kernels dealt to processes by cost; and a process with no share."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kv3d_jax import maximization, plan, refinement, runner

from tiny_model import tiny

TINY, TINY_PARAMS = tiny((4, 8, 8), features=4)


def test_units_cut_each_layer_and_carry_their_cost():
    work = plan.units({"a": list(range(5)), "b": [7, 3]}, 2, {"a": 1.0, "b": 10.0})
    assert [(u.layer, u.channels, u.flops) for u in work] == [
        ("a", (0, 1), 2.0), ("a", (2, 3), 2.0), ("a", (4,), 1.0), ("b", (7, 3), 20.0)]
    with pytest.raises(ValueError, match="at least 1 kernel"):
        plan.units({"a": [0]}, 0, {"a": 1.0})


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_every_kernel_is_dealt_once_and_the_costs_balance(processes):
    rng = np.random.default_rng(processes)
    pending = {f"l{i}": list(range(int(n))) for i, n in enumerate(rng.integers(1, 40, 6))}
    flops = {layer: float(rng.uniform(1, 100)) for layer in pending}
    work = plan.units(pending, 4, flops)
    shares = plan.deal(work, processes)
    assert len(shares) == processes
    dealt = sorted((u.layer, c) for share in shares for u in share for c in u.channels)
    assert dealt == sorted((layer, c) for layer, channels in pending.items() for c in channels)
    # Each share keeps the order of the work (layers in the order asked for).
    assert all([work.index(u) for u in share] == sorted(work.index(u) for u in share) for share in shares)
    # Largest first, to the least loaded: no process ends more than one unit above another.
    loads = [sum(u.flops for u in share) for share in shares]
    assert max(loads) - min(loads) <= max(u.flops for u in work) + 1e-9
    # Every process derives the same plan.
    assert plan.deal(work, processes) == shares


def test_a_process_with_no_kernels_gets_an_empty_result_of_the_stage_s_structure():
    config = maximization.preset("native", steps=1)
    problem = maximization.problem(TINY, "b", config, (4, 8, 8))
    result = runner.run(problem, TINY_PARAMS, np.zeros((0,), np.int32), [], 1, chunk=1)
    videos, objective = result.outputs
    assert videos.shape == (0, 4, 8, 8, 3) and objective.shape == (0,) and result.failed.shape == (0,)
    # Stage 3 from noise builds its result from the runner's outputs: none is an empty refinement.
    stage3 = refinement.problem(TINY, "b", refinement.Config(steps=1, preset=config), (4, 8, 8), False)
    outputs = runner.run(stage3, TINY_PARAMS, {"channel": np.zeros((0,), np.int32)}, [], 1, chunk=1).outputs
    assert [leaf.shape[0] for leaf in jax.tree.leaves(outputs)] == [0] * len(jax.tree.leaves(outputs))


def test_a_stage_1_step_is_counted_in_flops():
    config = maximization.preset("native")
    flops = plan.stage1_step_flops(TINY, TINY_PARAMS, "b", config)
    assert flops > plan.stage1_step_flops(TINY, TINY_PARAMS, "a", config) > 0
