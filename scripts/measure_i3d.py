"""How many steps the real Inception-I3D needs, and what a step costs (docs/inception_i3d.md).

* ``stage1 LAYER STEPS CHANNELS``: stage 1 at the native preset (16x112x112) on the shipped
  Kinetics-400 weights for a few channels of LAYER, printing the kernels' mean objective after
  every chunk of steps (where it saturates) and the seconds per step per kernel; the final videos
  go to /tmp/kv3d_i3d_stage1_LAYER.npz. Then XLA's cost analysis of one stage-1 step for one
  kernel (FLOPs of the forward and input gradient through LAYER).
* ``flops``: XLA's FLOPs of one stage-1 step of one kernel through each block output (the stem
  convolutions and every ``Mixed_*``) at the native 16x112x112 and at the paper preset's
  32x224x224, and of one stage-2 step of one 16x112x112 video: what a sweep costs.
* ``shares RUN_DIR``: for each layer of a ``kv3d visualize`` run folder, how many kernels are
  alive (not ``dead``), reliable, and aliased, with the median gain over random videos, share
  of frame change the translation explains, and PSNR.
* ``selective LAYER...``: every channel of each LAYER under kv3d agreement's drifting gratings
  (its grid, at the model's native clip): how many are direction-selective, and the 16 with the
  largest DSI among them, for ``--channels``.
* ``stage2 LAYER STEPS...``: stage 2 on those videos for each step count, printing the seconds
  per step per kernel, the reconstruction PSNR and the dominant direction, so that the step
  count where the read-out stops changing can be seen.

usage: python scripts/measure_i3d.py stage1 Mixed_3b 300 0,40,80
       python scripts/measure_i3d.py stage2 Mixed_3b 100 300 1000
       python scripts/measure_i3d.py flops
       python scripts/measure_i3d.py shares kv3d_i3d
       python scripts/measure_i3d.py selective Conv3d_1a_7x7 Conv3d_2c_3x3 Mixed_3b
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import agreement, decomposition, tuning, zoo
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import maximize, preset
from kv3d_jax.motion import motion_summary
from kv3d_jax.store import Store, params_checksum


def stage1(layer, steps, channels):
    model, params = zoo.load("inception_i3d")
    trace = []
    start = time.time()

    def callback(done, total, metric):
        trace.append((done, float(metric), time.time() - start))
        print(f"step {done:4d}/{total}  mean objective {float(metric):9.4f}  {time.time() - start:7.1f} s", flush=True)

    config = preset("native", steps=steps)
    result = maximize(model, params, layer, channels, config=config, key=jax.random.key(0), callback=callback)
    print("final objective per kernel:", np.round(np.asarray(result.objective), 4).tolist())
    # The first chunk includes compilation: the rate comes from the chunks after it.
    (s0, _, t0), (s1, _, t1) = trace[0], trace[-1]
    print(f"{(t1 - t0) / (s1 - s0) / len(channels):.3f} s per step per kernel ({len(channels)} kernels together)")
    np.savez(f"/tmp/kv3d_i3d_stage1_{layer}.npz", videos=np.asarray(result.videos), channels=np.asarray(channels),
             objective=np.asarray(result.objective))
    print(f"{flops_per_step(model, params, layer) / 1e9:.2f} GFLOP per stage-1 step per kernel (XLA cost analysis)")


def _flops(function, *args) -> float:
    analysis = jax.jit(function).lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def flops_per_step(model, params, layer, shape=None):
    """XLA's FLOP count of the forward and input gradient of one clip ``shape`` (default the
    native 16x112x112) through ``layer``, for one channel's mean."""
    def objective(video):
        return jnp.mean(model.features(params, video[None], upto=layer)[..., 0])

    return _flops(jax.grad(objective), jnp.zeros((*(shape or model.input_shape), 3), jnp.float32))


def sweep_flops():
    model, params = zoo.load("inception_i3d")
    blocks = [layer for layer in model.layers if layer.startswith("Conv3d") or
              (layer.startswith("Mixed") and "Branch" not in layer)]
    total = {"native": 0.0, "paper": 0.0}
    for layer in blocks:
        channels = model.num_channels(params, layer)
        native = flops_per_step(model, params, layer)
        paper = flops_per_step(model, params, layer, (32, 224, 224))
        total["native"] += channels * native
        total["paper"] += channels * paper
        print(f"{layer:15s} {channels:5d} channels  {native / 1e9:7.2f} GFLOP/step native  "
              f"{paper / 1e9:7.2f} paper", flush=True)
    print(f"all {sum(model.num_channels(params, b) for b in blocks)} block-output channels: "
          f"{total['native'] / 1e12:.1f} TFLOP per step native, {total['paper'] / 1e12:.1f} paper")
    config = decomposition.Config()
    video = jnp.zeros((*model.input_shape, 3))
    static, displacement = video[0], jnp.zeros((*model.input_shape, 2))
    grad = jax.grad(lambda s, d: decomposition.objective(s, d, video, config)[0], argnums=(0, 1))
    print(f"stage 2: {_flops(grad, static, displacement) / 1e9:.3f} GFLOP per step per 16x112x112 video")


def stage2(layer, step_counts):
    saved = np.load(f"/tmp/kv3d_i3d_stage1_{layer}.npz")
    videos, channels = jnp.asarray(saved["videos"]), saved["channels"]
    for steps in step_counts:
        start = time.time()
        dec = decompose(videos, channels, config=decomposition.Config(steps=steps), key=jax.random.key(0))
        jax.block_until_ready(dec.static)
        seconds = time.time() - start
        summary = motion_summary(dec, videos)
        print(f"{steps:5d} steps: {seconds / len(channels):6.1f} s per kernel (with compilation)  "
              f"PSNR {np.round(np.asarray(summary.psnr), 1).tolist()}  "
              f"direction {np.round(np.asarray(summary.direction_deg), 1).tolist()}  "
              f"speed {np.round(np.asarray(summary.speed), 2).tolist()}  "
              f"explained {np.round(np.asarray(summary.explained), 2).tolist()}", flush=True)


def selective(layers):
    model, params = zoo.load("inception_i3d")
    for layer in layers:
        responses = tuning.grating_responses(model, params, layer, agreement.DIRECTIONS, agreement.SPATIAL_FREQS,
                                             agreement.TEMPORAL_FREQS)
        result = tuning.direction_tuning(responses, agreement.DIRECTIONS)
        ds = np.flatnonzero(tuning.direction_selective(result))
        top = sorted(ds[np.argsort(-result.dsi[ds])][:16].tolist())
        print(f"{layer}: {ds.size} of {result.dsi.size} channels direction-selective; the 16 most: "
              f"{','.join(map(str, top))}", flush=True)


def shares(run_dir):
    job, model, params = agreement.load_run(run_dir)
    with Store.open(run_dir, job.config(model), params_checksum(params)) as store:
        for layer in [layer for layer in model.layers if layer in store.layers()]:
            schema = job.record(model).arrays()
            records = {c: store.read(layer, c, schema) for c in sorted(store.audit(layer, schema).done)}
            field = lambda name: np.asarray([float(r[name]) for r in records.values()])
            n, dead, reliable = len(records), field("dead").astype(bool), field("reliable").astype(bool)
            print(f"{layer}: {n} kernels, {n - dead.sum()} alive, {reliable.sum()} reliable, "
                  f"{int(field('aliased').sum())} aliased; median gain {np.median(field('gain')):.1f}, "
                  f"explained {np.median(field('explained')):.2f}, PSNR {np.median(field('psnr')):.1f} dB, "
                  f"reliability {np.median(field('reliability')):.2f}")
            print("  per kernel (channel: reliability, gain, explained, direction, speed):",
                  "; ".join(f"{c}: {float(r['reliability']):.2f} {float(r['gain']):.0f} {float(r['explained']):.2f} "
                            f"{float(r['direction_deg']):.0f} {float(r['speed']):.2f}" for c, r in records.items()))


if __name__ == "__main__":
    if sys.argv[1] == "stage1":
        stage1(sys.argv[2], int(sys.argv[3]), [int(c) for c in sys.argv[4].split(",")])
    elif sys.argv[1] == "flops":
        sweep_flops()
    elif sys.argv[1] == "selective":
        selective(sys.argv[2:])
    elif sys.argv[1] == "shares":
        shares(sys.argv[2])
    elif sys.argv[1] == "stage2":
        stage2(sys.argv[2], [int(s) for s in sys.argv[3:]])
    else:
        sys.exit(__doc__)
