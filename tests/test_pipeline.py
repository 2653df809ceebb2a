"""`kv3d visualize`'s pipeline: settings, model loading, chunked and resumed sweeps, and a sweep
killed with SIGKILL and restarted.

Run as a script (``python tests/test_pipeline.py OUT``) it sweeps the tiny model into OUT:
that is the process the kill test kills.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kv3d_jax import cli, decompose, decomposition, job, maximization, maximize, params_io, pipeline, reliability, zoo
from kv3d_jax import record as record_
from kv3d_jax.job import Job
from kv3d_jax.models import UnknownLayerError, motionnet
from kv3d_jax.store import StoreError, params_checksum

from tiny_model import tiny


# The layer the sweeps visualise is b, with 8 channels.
TINY, TINY_PARAMS = tiny((6, 16, 16), features=8)
# 4 steps a stage: stage 1 then compiles a 4-step unrolled chunk, not a 10-step one (2.5 times the
# compile); what these tests check (storage, keys, resume, quarantine, the gallery) is the same.
# Kernels are batched two per device, so a sweep of 8 stores them in 4 units a killed run can stop between.
JOB = Job(model="tiny", preset="native", steps=4, decompose_steps=4, seed=5, batch=2, media="gif")


def _sweep(out, channels="all", job=JOB, chunk=None) -> tuple[Path, str]:
    messages = []
    index = pipeline.visualize(TINY, TINY_PARAMS, job, ["b"], channels, out, log=messages.append, chunk=chunk)
    return index, "\n".join(messages)


def _kernels(out) -> dict[int, dict]:
    folder = Path(out) / "kernels" / "b"
    return {int(p.stem): dict(np.load(p)) for p in sorted(folder.glob("[0-9]*.npz"))}


def _stats(out) -> dict[int, tuple[int, int]]:
    return {int(p.stem): (p.stat().st_ino, p.stat().st_mtime_ns) for p in (Path(out) / "kernels" / "b").glob("[0-9]*.npz")}


def _assert_same_kernels(a: dict, b: dict) -> None:
    """Bit for bit: a kernel's record depends on its inputs and the job alone (pipeline's module doc)."""
    assert sorted(a) == sorted(b)
    for channel in a:
        assert sorted(a[channel]) == sorted(b[channel])
        for name in a[channel]:
            x, y = a[channel][name], b[channel][name]
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"channel {channel}: {name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Every kernel of ``b``, swept in one go in units of 4 kernels."""
    out = tmp_path_factory.mktemp("reference")
    _sweep(out, chunk=4)
    return _kernels(out)


def test_a_job_fills_in_the_default_job_and_the_presets_and_reads_back_from_its_record():
    default = job.DEFAULTS[job.DEFAULT_MODEL]
    assert Job.create() == Job(job.DEFAULT_MODEL, default["preset"], default["steps"], default["decompose_steps"])
    assert Job.create(preset="paper").steps == 1500
    assert Job.create("c3d") == Job("c3d", "paper", 1500, 2000, 0)
    assert Job.create("c3d", "native", 7, 9, seed=1, rectify=True) == Job("c3d", "native", 7, 9, 1, True)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        Job.create(preset="fast")
    with pytest.raises(ValueError, match="decompose_steps must be an integer of at least 1, got 0"):
        Job.create(decompose_steps=0)
    with pytest.raises(ValueError, match="unknown media 'avi'; valid ones are: "):
        Job.create(media="avi")
    config = json.loads(json.dumps(JOB.config(TINY)))
    assert Job.from_config(config) == JOB and config["video_shape"] == [6, 16, 16]
    with pytest.raises(ValueError, match="the run record has no batch, media: it was written by another kv3d"):
        Job.from_config({k: v for k, v in config.items() if k not in ("batch", "media")})
    # The stage configs are resolved from the job alone.
    assert JOB.stage1(TINY, "a") == maximization.preset("native", steps=4, rectify=True)
    assert JOB.stage2() == decomposition.Config(steps=4) and JOB.stage3(TINY, "b") is None
    maco = dataclasses.replace(JOB, parameterization="maco")
    assert maco.stage1(TINY, "b").parameterization == "maco" and "maco parameterization" in maco.describe(TINY, "b")
    assert dataclasses.replace(maco, refine_steps=2).stage3(TINY, "b").texture == "maco"
    assert maco.record(TINY).attribution and not JOB.record(TINY).attribution
    with pytest.raises(ValueError, match="unknown parameterization 'static_velocity'; valid ones are: pixel, fourier"):
        dataclasses.replace(JOB, parameterization="static_velocity")


def test_job_layers():
    assert job.layers(motionnet.model(), None) == motionnet.CONV_LAYERS
    assert job.layers(TINY, None, every=True) == ("a", "b")
    with pytest.raises(ValueError, match="name the layers of tiny to visualise .* valid layers are: a, b"):
        job.layers(TINY, None)
    with pytest.raises(UnknownLayerError, match="no layer 'c'; valid layers are: a, b"):
        job.layers(TINY, ["b", "c"])


def test_weights_are_a_params_file_or_a_checkpoint_converted_on_the_fly(tmp_path):
    _, shipped = zoo.load("motionnet")
    from_checkpoint = zoo.load("motionnet", motionnet.checkpoint_path())[1]
    params_file = params_io.save(tmp_path / "motionnet.msgpack", shipped)
    from_file = zoo.load("motionnet", params_file)[1]
    assert params_checksum(from_checkpoint) == params_checksum(from_file) == params_checksum(shipped)
    with pytest.raises(ValueError, match="c3d's weights do not ship with kv3d: give its checkpoint"):
        zoo.load("c3d")
    with pytest.raises(ValueError, match="these are not c3d params; missing: .*'conv1'"):
        zoo.load("c3d", params_file)
    named = params_io.save(tmp_path / "named.msgpack", shipped, "motionnet")
    with pytest.raises(ValueError, match="holds params of motionnet, not c3d"):
        zoo.load("c3d", named)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a kv3d params file"):
        zoo.load("motionnet", tmp_path / "notes.txt")


@pytest.mark.parametrize("spec, channels", [
    ("all", list(range(10))), ("0-3", [0, 1, 2, 3]), ("3,7,9", [3, 7, 9]), ("0-1, 4", [0, 1, 4]),
    ("0-3,2,1-2", [0, 1, 2, 3]), ("9,0", [9, 0]),
])
def test_parse_channels(spec, channels):
    assert pipeline.parse_channels(spec, 10) == channels


@pytest.mark.parametrize("spec, message", [
    ("3-1", "is empty"), ("a-b", "cannot read channels"), ("", "cannot"),
    ("0-6", r"conv1 has channels 0..5; got '0-6'"), ("0-300000000", "got '0-300000000'"),
    ("7", "got '7'"), ("1-" + "9" * 5000, "conv1 has channels 0..5"),
])
def test_parse_channels_rejects_bad_specs_before_building_them(spec, message):
    with pytest.raises(ValueError, match=message):
        pipeline.parse_channels(spec, 6, "conv1")


def test_parse_channels_never_builds_more_than_the_layer_has():
    assert pipeline.parse_channels(",".join(["0-5"] * 100_000), 6) == list(range(6))


def test_cli_reports_bad_layers_and_missing_weights(tmp_path, capsys):
    assert cli.main(["visualize", "--layer", "conv9", "--out", str(tmp_path / "a")]) == 2
    assert "motionnet has no layer 'conv9'; valid layers are: conv1, conv2, conv3, conv4, fc" in capsys.readouterr().err
    assert cli.main(["visualize", "--model", "c3d", "--layer", "conv1", "--out", str(tmp_path / "b")]) == 2
    assert "c3d needs --weights" in capsys.readouterr().err
    assert cli.main(["visualize", "--model", "c3d", "--out", str(tmp_path / "c")]) == 2
    assert "choose layers of c3d with --layer L" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_every_seed_and_layer_gets_its_own_key():
    # That a layer's key is the same in another process (a resumed sweep relies on it) is proven by
    # test_a_killed_sweep_resumes_without_redoing_finished_kernels: kernels from a killed
    # interpreter equal this one's. That a kernel's result depends on its key and not on its
    # batch: test_independence; on the channel and the stage: test_a_sweep_stores_every_kernel_...
    layers = ("a", "b", *motionnet.CONV_LAYERS)
    keys = {(seed, layer): tuple(np.asarray(jax.random.key_data(pipeline.layer_key(seed, layer))).ravel())
            for seed in (0, 5, 6) for layer in layers}
    assert len(set(keys.values())) == len(keys)


@pytest.mark.slow
def test_a_sweep_stores_every_kernel_and_a_gallery_with_local_files_only(tmp_path, reference):
    index, log = _sweep(tmp_path, channels="0-3")
    assert index == tmp_path / "index.html"
    kernels = _kernels(tmp_path)
    assert sorted(kernels) == [0, 1, 2, 3]
    record = kernels[1]
    assert record["video"].shape == (6, 16, 16, 3) and record["displacement"].shape == (6, 16, 16, 2)
    # A speed that cannot be told from its temporal alias is stored as NaN, nothing else.
    assert all(np.isfinite(kernels[c][name]) for c in kernels for name in record_.SUMMARY + record_.TRUST
               if name != "speed")
    assert all(np.isfinite(kernels[c]["speed"]) != bool(kernels[c]["aliased"]) for c in kernels)
    assert record["objective"].shape == () and str(record["layer"]) == "b" and int(record["channel"]) == 1
    # Each stage got the keys compute_chunk documents: (seed, layer, channel) and nothing else.
    key = pipeline.layer_key(JOB.seed, "b")
    stage1 = maximize(TINY, TINY_PARAMS, "b", channels=[1], config=maximization.preset("native", steps=JOB.steps),
                      key=jax.random.fold_in(key, 1))
    # Pictures and displacements are stored in float16 (record.HALF), summaries in float32.
    assert record["video"].dtype == np.float16 and record["objective"].dtype == np.float32
    np.testing.assert_allclose(record["video"], stage1.videos[0], rtol=0, atol=2.5e-4)
    np.testing.assert_allclose(record["objective"], stage1.objective[0], rtol=1e-6, atol=1e-6)
    stage2 = decompose(stage1.videos, config=decomposition.Config(steps=JOB.decompose_steps),
                       key=jax.random.fold_in(jax.random.fold_in(key, 2), 1)[None])
    np.testing.assert_allclose(record["displacement"], stage2.displacement[0], rtol=1e-3, atol=1e-4)
    assert "reconstruction" not in record
    links = _links(index) + _links(tmp_path / "b.html")
    assert "b.html" in _links(index)
    for link in links:
        assert "://" not in link and not link.startswith("/"), link
        assert (tmp_path / link).is_file(), link
    page = (tmp_path / "b.html").read_text()
    assert page.count('<article class="kernel') == 4
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"tiny_b_2_stage1.gif", "tiny_b_2_static.png",
                                                            "tiny_b_statics.png", "tiny_b_motion.png"}


@pytest.mark.slow
def test_linear_layers_are_rectified_and_every_record_says_how_far_to_trust_it(tmp_path):
    assert JOB.rectified(TINY, "a") and not JOB.rectified(TINY, "b")
    assert not dataclasses.replace(JOB, rectify_linear=False).rectified(TINY, "a")
    assert dataclasses.replace(JOB, rectify=True).rectified(TINY, "b")
    pipeline.visualize(TINY, TINY_PARAMS, JOB, ["a"], "0-2", tmp_path)
    records = {int(p.stem): dict(np.load(p)) for p in (tmp_path / "kernels" / "a").glob("*.npz")}
    key = pipeline.layer_key(JOB.seed, "a")
    config = maximization.preset("native", steps=JOB.steps, rectify=True)
    stage1 = maximize(TINY, TINY_PARAMS, "a", channels=[0, 1, 2], config=config, key=jax.random.fold_in(key, 1))
    random = reliability.baseline(TINY, TINY_PARAMS, "a", np.arange(3), jax.random.fold_in(key, 4), config)
    gain = np.asarray(reliability.gain(stage1.objective, random))
    for c, record in records.items():
        # Stage 1 maximised the channel after a ReLU: the rectified objective, never negative.
        np.testing.assert_allclose(record["objective"], stage1.objective[c], rtol=1e-6, atol=1e-6)
        assert record["objective"] >= 0
        np.testing.assert_allclose(record["gain"], gain[c], rtol=1e-5)
        assert 0.0 <= record["reliability"] <= 1.0 and 0.0 <= record["explained"] <= 1.0
        assert bool(record["reliable"]) == (record["reliability"] >= reliability.RELIABLE)
        assert record["dead"] in (0.0, 1.0) and record["aliased"] in (0.0, 1.0)
        if record["dead"]:
            assert record["reliability"] == 0.0
    page = (tmp_path / "a.html").read_text()
    assert "shown rectified" in page and "native preset, rectified" in page
    assert page.count("data-reliability=") == 3


def _links(page: Path) -> list[str]:
    class Links(html.parser.HTMLParser):
        found: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.found += [v for k, v in attrs if k in ("src", "href")]

    parser = Links()
    parser.found = []
    parser.feed(page.read_text())
    return parser.found


@pytest.mark.slow
def test_a_resumed_sweep_computes_only_missing_kernels(tmp_path, reference):
    _sweep(tmp_path, channels="0,2,5,7")
    before = _stats(tmp_path)
    _, log = _sweep(tmp_path)
    assert {c: _stats(tmp_path)[c] for c in before} == before
    _assert_same_kernels(_kernels(tmp_path), reference)
    done = _stats(tmp_path)
    _, log = _sweep(tmp_path)
    assert "all 8 kernels already in" in log
    assert _stats(tmp_path) == done


@pytest.mark.slow
def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    _sweep(tmp_path, channels="0-3")
    with pytest.raises(StoreError, match="steps: 4 there, 5 now.*Use another run folder"):
        _sweep(tmp_path, job=dataclasses.replace(JOB, steps=5))
    with pytest.raises(StoreError, match="rectify: False there, True now"):
        _sweep(tmp_path, job=dataclasses.replace(JOB, rectify=True))
    with pytest.raises(StoreError, match="batch: 2 there, 3 now"):
        _sweep(tmp_path, job=dataclasses.replace(JOB, batch=3))
    other = jax.tree.map(lambda x: x + 1, TINY_PARAMS)
    with pytest.raises(StoreError, match="model params: sha256"):
        pipeline.visualize(TINY, other, JOB, ["b"], "0-3", tmp_path)


@pytest.mark.slow
def test_corrupt_kernel_files_are_quarantined_and_recomputed(tmp_path, reference):
    _sweep(tmp_path, channels="0-3")
    folder = tmp_path / "kernels" / "b"
    truncated = (folder / "1.npz").read_bytes()[:100]
    (folder / "1.npz").write_bytes(truncated)
    np.savez(folder / "2.npz", **{**reference[2], "video": reference[2]["video"][:, :4]})
    (folder / "readme.txt").write_text("mine")
    (tmp_path / "kernels" / "conv9").mkdir()
    before = _stats(tmp_path)
    _, log = _sweep(tmp_path, channels="0-3")
    assert f"warning: {folder / '1.npz'}: unreadable kernel file" in log
    assert f"(quarantined to {tmp_path / 'quarantine' / 'b' / '1.npz.0'})" in log
    assert f"warning: {folder / '2.npz'}: video is float16[6, 4, 16, 3], expected float16[6, 16, 16, 3]" in log
    assert "readme.txt: not a kernel file (expected {channel}.npz) (ignored)" in log
    assert f"warning: {tmp_path / 'kernels' / 'conv9'}: not the kernels folder of a layer of this model (ignored)" in log
    assert (tmp_path / "quarantine" / "b" / "1.npz.0").read_bytes() == truncated
    assert (folder / "readme.txt").read_text() == "mine"
    after = _stats(tmp_path)
    assert after[0] == before[0] and after[3] == before[3]
    _assert_same_kernels(_kernels(tmp_path), {c: reference[c] for c in range(4)})


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_kernels(tmp_path, reference):
    folder = tmp_path / "kernels" / "b"
    # The script below writes kernels two by two, each unit a few tenths of a second apart.
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # Only a guard against a hung sweep: on a loaded 2-core machine its start alone took over 120 s.
        deadline = time.monotonic() + 600
        while not (folder.is_dir() and any(folder.glob("[0-9]*.npz"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep wrote no kernel within 600 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stderr.close()
    survivors = _stats(tmp_path)
    assert 1 <= len(survivors) < 8, f"the kill came too late to test anything: {sorted(survivors)}"

    _, log = _sweep(tmp_path)
    after = _stats(tmp_path)
    assert sorted(after) == list(range(8))
    assert {c: after[c] for c in survivors} == survivors
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".npz")] == []
    assert not (tmp_path / "quarantine").exists()
    # Identical to the sweep that was never interrupted (and ran in units of 4, in another process).
    _assert_same_kernels(_kernels(tmp_path), reference)


if __name__ == "__main__":
    pipeline.visualize(TINY, TINY_PARAMS, JOB, ["b"], "all", sys.argv[1])


@pytest.mark.slow
def test_a_maco_sweep_stores_and_draws_each_kernels_attribution_map_independently_of_its_batch(tmp_path):
    maco = dataclasses.replace(JOB, parameterization="maco")
    _sweep(tmp_path / "pair", "2,5", job=maco)
    _sweep(tmp_path / "alone", "5", job=maco)
    pair, alone = _kernels(tmp_path / "pair"), _kernels(tmp_path / "alone")
    for record in pair.values():
        assert record["attribution"].shape == (6, 16, 16) and record["attribution"].dtype == np.float32
        assert np.all(record["attribution"] >= 0) and record["attribution"].sum() > 0
    assert not np.array_equal(pair[2]["attribution"], pair[5]["attribution"])
    _assert_same_kernels({5: pair[5]}, alone)
    picture = tmp_path / "pair" / "b" / "tiny_b_5_attribution.gif"
    assert picture.is_file()
    page = (tmp_path / "pair" / "b.html").read_text()
    assert 'src="b/tiny_b_5_attribution.gif"' in page and "Attribution (MACO)" in page
