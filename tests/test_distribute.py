"""Kernels spread over devices, processes and memory give the results of one batch on one device.

Simulated CPU devices need ``XLA_FLAGS`` before jax starts, and ``jax.distributed`` needs
processes of its own, so those tests run Python in subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import decomposition, distribute, maximization, models, params_io, refinement, runner, zoo
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import maximize
from kv3d_jax.models import motionnet

ROOT = Path(__file__).parents[1]


def _python(code: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_every_stage_sharded_over_any_1d_mesh_equals_one_device():
    # The meshes a JAX user builds: jax.make_mesh with its default (explicit) axis types, any axis
    # name, a hand-built Mesh, a part of the devices, and none (all local devices), also with a
    # mesh set as the context.
    code = """
        import functools, json
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        import kv3d_jax
        from kv3d_jax import decomposition, distribute, maximization, refinement, runner, zoo

        assert jax.local_device_count() == 8
        # Meshes that lower to the same program (a mesh and the same mesh set as the context) read
        # it back from the worker's cache instead of compiling it again.
        runner.enable_compilation_cache()
        model, params = zoo.load("motionnet")
        # Every stage with its default randomness (stage 1's jitter, stage 2's start), and the
        # later stages fed the one-device run's results, so each stage is compared on equal input.
        stage1 = maximization.preset("native", shape=(8, 16, 16), steps=4, chunk=2)
        channels = [0, 3, 5, 9, 11]
        meshes = {
            "make_mesh": jax.make_mesh((8,), ("kernels",)),
            "make_mesh named k": jax.make_mesh((4,), ("k",), devices=jax.devices()[4:]),
            "Mesh": Mesh(np.array(jax.devices()), ("kernels",)),
            "default": None,
        }

        def stages(mesh, batch_size=None, inputs=None):
            kw = dict(mesh=mesh, batch_size=batch_size, key=jax.random.key(3))
            one = kv3d_jax.maximize(model, params, "conv2", channels, config=stage1, **kw)
            two = kv3d_jax.decompose(inputs["videos"] if inputs else one.videos, channels,
                                     config=decomposition.Config(steps=4, chunk=2), **kw)
            three = kv3d_jax.refine(model, params, "conv2", inputs["decomposition"] if inputs else two, channels,
                                    config=refinement.Config(steps=4, preset=stage1, chunk=2), **kw)
            return {"videos": one.videos, "objective": one.objective, "static": two.static,
                    "displacement": two.displacement, "refined_video": three.video,
                    "refined_objective": three.objective, "decomposition": two}

        # The batch size asked for where it is not what is tested: the runner then skips the
        # compiles that size a batch from memory (the default mesh still sizes its own). On the
        # 4-device mesh a batch of 2 is rounded up to 4: two batches, the second with 3 padded.
        reference = stages(distribute.kernel_mesh(jax.devices()[:1]), batch_size=5)
        stages = functools.partial(stages, inputs=reference)
        batch = {"default": None, "make_mesh named k": 2}
        results = {name: stages(mesh, batch_size=batch.get(name, 5)) for name, mesh in meshes.items()}
        results["Mesh, batch 2 padded to 8"] = stages(meshes["Mesh"], batch_size=2)
        with jax.set_mesh(meshes["make_mesh"]):
            results["make_mesh as context"] = stages(meshes["make_mesh"], batch_size=5)
        print(json.dumps({
            name: {field: float(np.abs(np.asarray(value) - np.asarray(reference[field])).max())
                   for field, value in result.items() if field != "decomposition"}
            for name, result in results.items()
        }))
    """
    out = json.loads(_finish(_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}), timeout=600))
    assert set(out) == {"make_mesh", "make_mesh named k", "Mesh", "default", "Mesh, batch 2 padded to 8",
                        "make_mesh as context"}
    for name, differences in out.items():
        for field, difference in differences.items():
            assert difference <= 1e-5, (name, field, difference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_every_kernel_once(tmp_path):
    weights = tmp_path / "motionnet.msgpack"
    params_io.save(weights, zoo.load("motionnet")[1])
    address = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    processes = [
        _python(f"""
            import sys
            from kv3d_jax.cli import main
            sys.exit(main(["maximize", "--model", "motionnet", "--weights", "{weights}", "--layer", "conv2",
                           "--preset", "native", "--steps", "2", "--out", "{out}", "--coordinator", "{address}",
                           "--num-processes", "2", "--process-id", "{i}"]))
        """) for i in range(2)
    ]
    for process in processes:
        _finish(process)
    parts = [np.load(out / f"motionnet_conv2_stage1_process{i}.npz") for i in range(2)]
    written = np.concatenate([part["channels"] for part in parts])
    assert sorted(written.tolist()) == list(range(32))  # MotionNet conv2: 32 channels, each once
    assert all(len(part["channels"]) == 16 for part in parts)
    gifs = sorted(p.name for p in out.glob("*_stage1.gif"))
    assert gifs == sorted(f"motionnet_conv2_{c}_stage1.gif" for c in range(32))


def _linear_program(n: int) -> jax.stages.Compiled:
    """A program whose memory grows by 1 MiB of input and output per kernel."""
    return jax.jit(lambda x: jnp.sin(x) * 2).lower(jax.ShapeDtypeStruct((n, 2**18), jnp.float32)).compile()


def test_kernels_per_device_follows_the_memory_analysis():
    one, two = distribute.program_bytes(_linear_program(1)), distribute.program_bytes(_linear_program(2))
    per_kernel, fixed = two - one, 2 * one - two
    assert per_kernel >= 2**20
    assert distribute.kernels_per_device(_linear_program, fixed + 5 * per_kernel, wanted=64) == 5
    assert distribute.kernels_per_device(_linear_program, fixed + 5 * per_kernel, wanted=3) == 3
    with pytest.raises(MemoryError, match="one kernel needs .* over the budget .* or a larger memory_budget"):
        distribute.kernels_per_device(_linear_program, one - 1, wanted=4)


SMALL = (8, 16, 16)


def _chunk_bytes(problem, params, targets, per_device: int, length: int) -> float:
    """Memory the runner plans for a batch: XLA's analysis of its compiled chunk, scaled."""
    undercount = distribute.analysis_undercount(distribute.kernel_mesh())
    return undercount * distribute.program_bytes(runner.compiled_chunk(problem, params, targets, per_device, length))


def _budget_for(problem, params, targets, length: int, kernels: int) -> int:
    """A memory budget that fits ``kernels`` kernels per device and not one more."""
    one, two = (_chunk_bytes(problem, params, targets, n, length) for n in (1, 2))
    return int(one + (kernels - 1) * (two - one) + (two - one) // 2)


@pytest.mark.slow
def test_a_memory_budget_splits_the_kernels_into_batches_with_the_same_results():
    model, params = models.get("motionnet"), motionnet.init_params(jax.random.PRNGKey(0))
    config = maximization.preset("native", steps=2, shape=SMALL)
    run = lambda **kw: maximize(model, params, "conv2", [1, 2, 5], config=config, **kw)
    whole = run()
    problem = maximization.problem(model, "conv2", config, SMALL)
    targets = jnp.zeros((1,), jnp.int32)
    totals = []
    batched = run(memory_budget=_budget_for(problem, params, targets, 2, 2),
                  callback=lambda done, total, _: totals.append(total))
    assert totals[-1] == 2 * 2  # two batches (2 kernels, then 1 padded), 2 steps each
    np.testing.assert_allclose(batched.videos, whole.videos, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batched.channels, [1, 2, 5])
    with pytest.raises(MemoryError, match="one kernel needs"):
        run(memory_budget=int(_chunk_bytes(problem, params, targets, 1, 2) * 0.5))


@pytest.mark.slow
def test_refine_and_decompose_batch_from_the_memory_budget_too():
    model, params = models.get("motionnet"), motionnet.init_params(jax.random.PRNGKey(0))
    stage1 = maximization.preset("native", shape=SMALL, steps=2)
    start = maximize(model, params, "conv2", [1, 2, 5], config=stage1)
    config = decomposition.Config(steps=3)
    dec_problem = decomposition.problem(config, False)
    totals = []
    whole = decompose(start.videos, config=config)
    batched = decompose(start.videos, config=config, memory_budget=_budget_for(dec_problem, {}, start.videos, 3, 1),
                        callback=lambda done, total, _: totals.append(total))
    assert totals[-1] == 3 * 3  # three batches of one kernel
    for field in ("static", "displacement", "reconstruction"):
        np.testing.assert_allclose(getattr(batched, field), getattr(whole, field), atol=1e-5, rtol=0, err_msg=field)

    refine_config = refinement.Config(steps=2, preset=stage1)
    problem = refinement.problem(model, "conv2", refine_config, SMALL, True)
    targets = {"channel": jnp.zeros((1,), jnp.int32), "start": refinement.from_decomposition(whole),
               "reconstruction": whole.reconstruction}
    targets = jax.tree.map(lambda leaf: leaf[:1], targets)
    totals.clear()
    refined = refinement.refine(model, params, "conv2", whole, [1, 2, 5], config=refine_config,
                                memory_budget=_budget_for(problem, params, targets, 2, 2),
                                callback=lambda done, total, _: totals.append(total))
    assert totals[-1] == 2 * 2  # 2 kernels, then 1 padded
    alone = refinement.refine(model, params, "conv2", whole, [1, 2, 5], config=refine_config, batch_size=3)
    np.testing.assert_allclose(refined.video, alone.video, atol=1e-5, rtol=0)
    with pytest.raises(MemoryError, match="one kernel needs"):
        refinement.refine(model, params, "conv2", whole, [1, 2, 5], config=refine_config,
                          memory_budget=int(_chunk_bytes(problem, params, targets, 1, 2) * 0.5))


def test_a_mesh_of_more_than_one_axis_is_refused():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("a", "b"))
    with pytest.raises(ValueError, match="1-D mesh of devices.*jax.make_mesh"):
        distribute.as_kernel_mesh(mesh)
