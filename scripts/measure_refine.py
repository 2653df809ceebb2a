"""What the refinement (stage 3) does: its objective against stage 1's, and its motion against stage 2's.

* ``c3d``: C3D with random weights, every layer, a few channels (native preset at 8×H×H):
  stage-1 and refined objectives and their ratio, per kernel and for the layer (its kernels'
  objectives summed: a kernel whose stage-1 optimum is negative, one the random weights left
  dead, has no meaningful ratio of its own), and each kernel's change of dominant
  direction from the decomposition and from the start (the decomposition's displacement as
  the default motion allows it: its constant-velocity fit).
* ``motionnet``: the embedded model's direction-selective channels (up to 16 per layer):
  median angular difference between the grating-preferred direction and the stage-2 and
  refined dominant directions, for each refinement motion (``Config.motion``). (For a whole
  run, ``kv3d visualize --refine`` then ``kv3d agreement --stage refined`` gives the same
  comparison for every channel, with the default motion.)

usage: python scripts/measure_refine.py c3d [steps1 dsteps rsteps channels size]
       python scripts/measure_refine.py motionnet [steps1 dsteps rsteps [layers...]]
"""
import dataclasses
import sys
import time

import jax
import numpy as np

from kv3d_jax import decomposition, models, tuning, zoo
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import PRESETS, maximize, preset as stage1_config
from kv3d_jax.models import c3d, motionnet
from kv3d_jax.motion import motion_summary
from kv3d_jax.refinement import DEFAULT_STEPS, MOTIONS, Config, refine, used_displacement


def c3d_run(steps1=100, dsteps=200, rsteps=DEFAULT_STEPS, nch=4, hw=32):
    model = models.get("c3d")
    params = jax.jit(c3d.init_params)(jax.random.PRNGKey(0))
    shift = max(1, hw // 16)
    preset = dataclasses.replace(PRESETS["native"], shape=(8, hw, hw), max_shift=(shift, shift, 2))
    channels = list(range(nch))
    for layer in model.layers:
        t = time.time()
        rect = layer == "conv1"
        stage1 = stage1_config(preset, steps=steps1, rectify=rect)
        s1 = maximize(model, params, layer, channels, config=stage1)
        dec = decompose(s1.videos, channels, config=decomposition.Config(steps=dsteps))
        r = refine(model, params, layer, dec, channels, config=Config(steps=rsteps, preset=stage1))
        # The refinement starts from the decomposition's displacement as its motion allows it.
        start = dec.replace(displacement=used_displacement({"displacement": dec.displacement}))
        m0, ms, m1 = motion_summary(dec), motion_summary(start), motion_summary(r)
        ratio = np.asarray(r.objective) / np.asarray(s1.objective)
        dd = tuning.angular_difference(m0.direction_deg, m1.direction_deg)
        ds = tuning.angular_difference(ms.direction_deg, m1.direction_deg)
        print(f"{layer}{' (rectified)' if rect else ''}: {time.time() - t:.0f}s  stage1 {np.round(s1.objective, 3)} "
              f"refined {np.round(r.objective, 3)} ratio {np.round(ratio, 3)} min {ratio.min():.3f}; layer "
              f"{np.sum(r.objective) / np.sum(s1.objective):.3f} (summed over its kernels)")
        print(f"   dir stage2 {np.round(m0.direction_deg, 1)} start {np.round(ms.direction_deg, 1)} refined "
              f"{np.round(m1.direction_deg, 1)}; change from stage 2 {np.round(dd, 1)}, from the start {np.round(ds, 1)}; "
              f"speed {np.round(m0.speed, 2)} -> start {np.round(ms.speed, 2)} -> {np.round(m1.speed, 2)}; "
              f"psnr vs stage 2 {np.round(r.psnr, 1)}", flush=True)


def motionnet_run(steps1=200, dsteps=200, rsteps=DEFAULT_STEPS, layers=motionnet.CONV_LAYERS, most=16):
    model, params = zoo.load("motionnet")
    directions = np.arange(16) * 22.5
    for layer in layers:
        t = time.time()
        resp = tuning.grating_responses(model, params, layer, directions, (0.05, 0.1, 0.2), (0.05, 0.1, 0.2))
        tun = tuning.direction_tuning(resp, directions)
        ds = np.flatnonzero(tun.dsi >= tuning.DS_THRESHOLD)
        if ds.size == 0:
            print(f"{layer}: no DS channels")
            continue
        peak = resp.reshape(-1, resp.shape[-1]).max(0)
        print(f"{layer}: {ds.size} DS channels, {np.sum(peak[ds] >= 1e-2)} of them with peak response >= 1e-2")
        ds = ds[np.round(np.linspace(0, ds.size - 1, min(most, ds.size))).astype(int)]
        rect = layer in model.linear_layers
        stage1 = stage1_config("native", steps=steps1, rectify=rect)
        s1 = maximize(model, params, layer, ds, config=stage1)
        dec = decompose(s1.videos, ds, config=decomposition.Config(steps=dsteps))
        m0 = motion_summary(dec)
        d2 = tuning.angular_difference(tun.preferred_deg[ds], m0.direction_deg)
        print(f"{layer}: {ds.size} DS channels measured; median |grating - stage2| {np.nanmedian(d2):.1f} deg")
        for motion in MOTIONS:
            r = refine(model, params, layer, dec, ds, config=Config(motion=motion, steps=rsteps, preset=stage1))
            m1 = motion_summary(r)
            d3 = tuning.angular_difference(tun.preferred_deg[ds], m1.direction_deg)
            print(f"   {motion} motion: median |grating - refined| {np.nanmedian(d3):.1f} deg, closer than stage 2 on "
                  f"{np.sum(d3 < d2)}; within 45: stage2 {np.mean(d2 <= 45):.2f} refined {np.mean(d3 <= 45):.2f}; "
                  f"objective stage1 {np.mean(s1.objective):.3f} refined {np.mean(r.objective):.3f} "
                  f"(ratio min {np.min(np.asarray(r.objective) / np.asarray(s1.objective)):.3f}); {time.time() - t:.0f}s")
            print("   per channel (ch, grating, stage2, refined, speed2, speed3): " + "; ".join(
                f"{c} {g:.0f} {a:.0f} {b:.0f} {s:.2f} {u:.2f}" for c, g, a, b, s, u in zip(
                    ds, tun.preferred_deg[ds], np.asarray(m0.direction_deg), np.asarray(m1.direction_deg),
                    np.asarray(m0.speed), np.asarray(m1.speed))), flush=True)


if __name__ == "__main__":
    which, *rest = sys.argv[1:]
    if which == "c3d":
        c3d_run(*[int(a) for a in rest])
    else:
        nums = [int(a) for a in rest[:3]]
        lays = rest[3:] or motionnet.CONV_LAYERS
        motionnet_run(*nums, layers=lays)
