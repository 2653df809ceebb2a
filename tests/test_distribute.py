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

from kv3d_jax import distribute, models, params_io, zoo
from kv3d_jax.maximize import PRESETS, init_state, kernel_keys, make_step, maximize
from kv3d_jax.models import motionnet

ROOT = Path(__file__).parents[1]


def _python(code: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def test_sharded_over_8_devices_equals_one_device():
    # The jitter is switched off (shift 0, scale 1): under SPMD partitioning XLA rewrites the
    # jitter's divisions differently, and Adam's normalised step turns those 1-ulp differences
    # in near-zero gradients into visible ones. Without it the results must agree exactly.
    code = """
        import dataclasses, json
        import jax, numpy as np
        from kv3d_jax import distribute, models
        from kv3d_jax.maximize import PRESETS, init_state, kernel_keys, make_step, maximize
        from kv3d_jax.models import motionnet

        assert jax.local_device_count() == 8
        model, params = models.get("motionnet"), motionnet.init_params(jax.random.PRNGKey(0))
        preset = dataclasses.replace(PRESETS["native"], shape=(8, 16, 16), max_shift=(1, 1, 1), scales=(1.0,))
        run = lambda **kw: maximize(model, params, "conv3", [0, 3, 5, 9, 11], preset, steps=4, chunk=2, **kw)
        one = run(mesh=distribute.kernel_mesh(jax.devices()[:1]))
        results = {"auto batch": run(), "batch 2, padded to 8": run(batch_size=2)}
        shards = distribute.shard_kernels(np.zeros((8, 3)), distribute.kernel_mesh())
        print(json.dumps({
            "shards": sorted(s.data.shape[0] for s in shards.addressable_shards),
            "channels": {k: r.channels.tolist() for k, r in results.items()},
            "videos": {k: float(np.abs(np.asarray(r.videos) - np.asarray(one.videos)).max()) for k, r in results.items()},
            "objective": {k: float(np.abs(np.asarray(r.objective) - np.asarray(one.objective)).max())
                          for k, r in results.items()},
        }))
    """
    out = json.loads(_finish(_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})))
    assert out["shards"] == [1] * 8
    for name in out["videos"]:
        assert out["channels"][name] == [0, 3, 5, 9, 11], name
        assert out["videos"][name] <= 1e-5, name
        assert out["objective"][name] <= 1e-5, name


def test_decompose_sharded_over_8_devices_equals_one_device():
    code = """
        import json
        import jax, numpy as np
        from kv3d_jax import decompose, distribute
        from kv3d_jax.stimuli import translating_texture

        videos = np.stack([translating_texture(np.random.default_rng(k), 6, 16, 16, (0.5 * k - 1, 0.7)) for k in range(5)])
        run = lambda **kw: decompose(videos, steps=30, key=jax.random.PRNGKey(3), ids=[2, 4, 6, 8, 10], **kw)
        one, eight = run(mesh=distribute.kernel_mesh(jax.devices()[:1])), run()
        print(json.dumps({
            # Each device runs per_kernel's function on its own slice: 16 kernels, 2 per device.
            "seen": np.asarray(distribute.per_kernel(lambda x: x * 0 + x.shape[0], distribute.kernel_mesh())(
                np.ones(16))).tolist(),
            "shapes": [list(a.shape) for a in (eight.static, eight.displacement, eight.reconstruction, eight.psnr)],
            "difference": {name: float(np.abs(np.asarray(getattr(eight, name)) - np.asarray(getattr(one, name))).max())
                           for name in ("static", "displacement", "reconstruction", "psnr")},
        }))
    """
    out = json.loads(_finish(_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})))
    assert out["shapes"] == [[5, 16, 16, 3], [5, 6, 16, 16, 2], [5, 6, 16, 16, 3], [5]]
    assert out["seen"] == [2.0] * 16
    for name, difference in out["difference"].items():
        assert difference <= 1e-5, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _step_bytes(model, params, layer, preset, k: int) -> int:
    """Memory of one jitted stage-1 step of ``k`` kernels, from XLA's memory analysis."""
    init_keys, run_keys = kernel_keys(jax.random.PRNGKey(0), np.arange(k))
    state = init_state(init_keys, jnp.arange(k), SMALL)
    return distribute.program_bytes(jax.jit(make_step(model, layer, preset)).lower(params, state, run_keys).compile())


def test_a_memory_budget_splits_the_kernels_into_batches_with_the_same_results():
    model, params, preset = models.get("motionnet"), motionnet.init_params(jax.random.PRNGKey(0)), PRESETS["native"]
    run = lambda **kw: maximize(model, params, "conv2", [1, 2, 5], preset, steps=2, shape=SMALL, **kw)
    whole = run()
    two = _step_bytes(model, params, "conv2", preset, 2)
    per_kernel = two - _step_bytes(model, params, "conv2", preset, 1)
    totals = []
    undercount = distribute.analysis_undercount(distribute.kernel_mesh())
    batched = run(memory_budget=int(undercount * (two + per_kernel // 2)),
                  callback=lambda done, total, _: totals.append(total))
    assert totals[-1] == 2 * 2  # two batches (2 kernels, then 1 padded), 2 steps each
    np.testing.assert_allclose(batched.videos, whole.videos, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(batched.channels, [1, 2, 5])
    with pytest.raises(MemoryError, match="one kernel needs"):
        run(memory_budget=int(undercount * per_kernel // 2))


def test_a_mesh_that_cannot_shard_kernels_is_refused():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="axis 'kernels'.*kernel_mesh"):
        distribute.check_mesh(mesh)

