"""`kv3d visualize --diversity N`: N diverse optima in every kernel record, drawn side by side in the
gallery; per-kernel independence, failures, older run folders and the command line."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kv3d_jax import cli, distribute, diversity, gallery, job, maximization, pipeline, record, render, runner

from tiny_model import tiny

SHAPE = (4, 8, 8)
TINY, TINY_PARAMS = tiny(SHAPE, features=3)
# Two steps a stage: the cheapest programs to compile; what is checked here does not need more.
JOB = job.Job(model="tiny", preset="native", steps=2, decompose_steps=2, seed=3, batch=2, media="gif", rectify=True,
              diversity=2)
PLAIN = dataclasses.replace(JOB, diversity=0)
DIVERSE = ("diverse_video", "diverse_objective", "diverse_cosine")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A `kv3d visualize --diversity 2` run folder of channels 0 and 1 of the tiny model's layer b, and
    its kernel records."""
    out = tmp_path_factory.mktemp("diverse")
    pipeline.visualize(TINY, TINY_PARAMS, JOB, ["b"], "0,1", out, log=[].append)
    return out, {c: dict(np.load(out / "kernels" / "b" / f"{c}.npz")) for c in (0, 1)}


def _same(a, b) -> bool:
    return np.array_equal(a, b, equal_nan=np.asarray(a).dtype.kind == "f")


@pytest.mark.slow
def test_a_diverse_run_stores_n_optima_per_kernel_and_draws_them_side_by_side(run):
    out, records = run
    expected = {"diverse_video": ((2, *SHAPE, 3), "float16"), "diverse_objective": ((2,), "float32"),
                "diverse_cosine": ((2, 2), "float32")}
    assert {name: JOB.record(TINY).arrays()[name] for name in DIVERSE} == expected
    page = (out / "b.html").read_text()
    for channel, arrays in records.items():
        for name, (shape, dtype) in expected.items():
            assert arrays[name].shape == shape and arrays[name].dtype == dtype, (channel, name)
        assert arrays["failed"] == 0 and np.all(np.isfinite(arrays["diverse_objective"]))
        video = arrays["diverse_video"]
        assert np.all((video >= 0) & (video <= 1)) and not np.array_equal(video[0], video[1])
        np.testing.assert_allclose(np.diag(arrays["diverse_cosine"]), 1.0, atol=1e-5)
        # One picture: the two optima side by side, 2 px apart, one frame per video frame.
        with Image.open(out / "b" / f"tiny_b_{channel}_diverse.gif") as strip:
            assert strip.size == (2 * SHAPE[2] + 2, SHAPE[1])
        # Its card: the picture, each optimum's share of the best, the largest cosine and the badge.
        card = page[page.index(f'id="channel-{channel}"'):].split("</article>")[0]
        assert f'src="b/tiny_b_{channel}_diverse.gif"' in card
        objective = arrays["diverse_objective"].astype(np.float64)
        shares = [f"{100 * x / objective.max():.3g} %" for x in objective]
        assert re.findall(r'<span class="fraction">([^<]*)</span>', card) == shares
        cosine = float(arrays["diverse_cosine"][0, 1])
        assert f'max pairwise cosine <span class="cosine">{cosine:.2f}</span>' in card
        distinct = cosine <= gallery.DISTINCT_COSINE and min(objective) >= gallery.DISTINCT_FRACTION * max(objective)
        assert (">distinct</span>" if distinct else ">alike</span>") in card
    assert "Diverse optima:" in page and "“distinct” = every cosine at most 0.5" in page
    assert '<option value="diverse_cosine">' in page and "2 diverse optima (2 steps), seed 3" in page


@pytest.mark.slow
def test_a_kernels_diverse_optima_do_not_depend_on_its_batch_mates_nor_change_the_rest_of_its_record(run):
    _, records = run
    alone = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [1], JOB)[1]
    for name in DIVERSE:
        assert _same(alone[name], records[1][name]), name
    # Without diversity a record holds the same arrays, bit for bit, less the diverse ones.
    plain = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [0, 1], PLAIN)
    for channel, arrays in plain.items():
        assert sorted(arrays) == sorted(set(records[channel]) - set(DIVERSE) - {"layer", "channel"})
        for name, value in arrays.items():
            assert _same(value, records[channel][name]), (channel, name)
    assert PLAIN.record(TINY) == record.KernelRecord(SHAPE, media="gif")
    assert JOB.record(TINY).kinds() == PLAIN.record(TINY).kinds() + ("diverse",)


def _spoiled(channel: int):
    """The tiny model's params with a NaN in a weight of layer b's output ``channel``."""
    params = jax.tree.map(lambda leaf: leaf, TINY_PARAMS)
    params["params"]["b"]["kernel"] = jnp.asarray(params["params"]["b"]["kernel"]).at[0, 1, 1, 0, channel].set(jnp.nan)
    return params


@pytest.mark.slow
def test_a_failed_diverse_run_is_recorded_for_its_kernel_alone(run, monkeypatch, tmp_path):
    _, records = run
    real = diversity.maximize_diverse

    # Channel 1's diverse run turns non-finite as the runner reports it; stages 1-3 see clean params.
    def failing(*args, **kwargs):
        result = real(*args, **kwargs)
        return result.replace(failed=np.asarray(result.channels) == 1)

    monkeypatch.setattr(diversity, "maximize_diverse", failing)
    broken = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [0, 1], JOB)
    for name, value in broken[0].items():
        assert _same(value, records[0][name]), name
    for name, value in broken[1].items():
        assert np.all(np.isnan(value)) if name in DIVERSE else _same(value, records[1][name]), name
    # The card says so; every other picture is still drawn.
    view = JOB.record(TINY).view("b", 1, broken[1], {"diverse": "b/d.gif"})
    assert view.diverse_failed and view.failed == 0
    page = gallery.layer_page("t", [view])
    assert '<span class="badge failed">failed</span>' in page and '"badge failed">failed in stage' not in page
    pipeline.write_media(tmp_path, "tiny", "b", 1, broken[1], JOB.record(TINY))
    assert set(p.name for p in tmp_path.iterdir()) == set(JOB.record(TINY).files("tiny", "b", 1).values())

    # A NaN weight of one channel: its stage 1 and its diverse run fail, the other channel's do not.
    # The activation patterns span every channel of the layer; the spoiled channel enters them as a
    # channel of zero weights, so the other kernel's optima are those of the params with it zeroed.
    monkeypatch.setattr(diversity, "maximize_diverse", real)
    spoiled = pipeline.compute_chunk(TINY, _spoiled(1), "b", [0, 1], JOB)
    assert spoiled[1]["failed"] == 1 and spoiled[0]["failed"] == 0
    assert all(np.all(np.isnan(spoiled[1][name])) for name in DIVERSE)
    for name, value in spoiled[0].items():
        if name not in DIVERSE:
            assert _same(value, records[0][name]), name
    zeroed = jax.tree.map(lambda leaf: leaf, TINY_PARAMS)
    zeroed["params"]["b"] = {name: jnp.asarray(leaf).at[..., 1].set(0.0)
                             for name, leaf in TINY_PARAMS["params"]["b"].items()}
    alike = diversity.maximize_diverse(TINY, zeroed, "b", [0, 1], 2, config=JOB.stage1(TINY, "b"),
                                       key=jax.random.fold_in(pipeline.layer_key(JOB.seed, "b"), 6),
                                       per_device=JOB.batch, share=False)
    expected = {"diverse_video": np.asarray(alike.videos[0], np.float16), "diverse_objective": alike.objective[0],
                "diverse_cosine": alike.cosine[0]}
    for name in DIVERSE:
        assert np.all(np.isfinite(spoiled[0][name])) and _same(spoiled[0][name], expected[name]), name


def test_the_setting_is_described_counted_and_checked():
    # That run.json records it only when used, and old folders open: test_store.py, test_a_later_setting_*.
    assert "2 diverse optima (2 steps)" in JOB.describe(TINY, "b") and "diverse" not in PLAIN.describe(TINY, "b")
    # Two optima of stage 1's steps cost two stage-1 runs; of 7 steps, two runs of 7.
    assert JOB.steps_per_kernel() == PLAIN.steps_per_kernel() + 2 * JOB.steps
    longer = dataclasses.replace(JOB, diversity_steps=7)
    assert longer.steps_per_kernel() == PLAIN.steps_per_kernel() + 2 * 7
    assert longer.diverse(TINY, "b") == dataclasses.replace(JOB.stage1(TINY, "b"), steps=7)
    for bad in (1, -2, job.MAX_DIVERSITY + 1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="diversity must be 0 .no diverse optima. or 2 to 64 optima per kernel"):
            dataclasses.replace(JOB, diversity=bad)
    for bad in (-1, True, 3.0):
        with pytest.raises(ValueError, match="diversity_steps must be an integer of at least 1 .or 0 for stage 1's"):
            dataclasses.replace(JOB, diversity_steps=bad)
    with pytest.raises(ValueError, match="set diversity to 2 or more optima per kernel, or leave diversity_steps at 0"):
        dataclasses.replace(PLAIN, diversity_steps=7)
    # A run folder from before the setting ran its diverse optima for stage 1's steps, and still reads so.
    before = {name: value for name, value in JOB.config(TINY).items() if name != "diversity_steps"}
    assert job.Job.from_config(before).diverse_steps() == JOB.steps
    # Naming stage 1's steps is that same job, so such a folder resumes under a command that names them.
    assert dataclasses.replace(JOB, diversity_steps=JOB.steps) == JOB and "diversity_steps" not in JOB.config(TINY)
    # A new job's diverse run gets stage 1's steps, but at least the steps that make optima distinct.
    assert job.Job.create(steps=40, diversity=4).diverse_steps() == job.DIVERSITY_STEPS
    assert job.Job.create(steps=900, diversity=4).diverse_steps() == 900
    assert job.Job.create(steps=40, diversity=4, diversity_steps=60).diverse_steps() == 60
    assert job.Job.create(steps=40).diverse_steps() == 0


@pytest.mark.slow
def test_the_diverse_run_takes_its_own_steps(monkeypatch):
    seen = []
    real = diversity.maximize_diverse

    def recording(*args, config, **kwargs):
        seen.append(config)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(diversity, "maximize_diverse", recording)
    longer = dataclasses.replace(JOB, diversity_steps=3)
    records = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [1], longer)
    assert seen == [longer.diverse(TINY, "b")] and seen[0].steps == 3
    assert np.all(np.isfinite(records[1]["diverse_objective"]))


@pytest.mark.slow
def test_check_memory_sizes_the_diverse_program_too():
    # The budget that stage 1's batch needs exactly, measured as check_memory measures it.
    config = PLAIN.stage1(TINY, "b")
    mesh = distribute.kernel_mesh()
    problem = maximization.problem(TINY, "b", config, SHAPE, jnp.dtype(jnp.float32))
    compiled = runner.compiled_chunk(problem, TINY_PARAMS, jnp.zeros((1,), jnp.int32), PLAIN.batch,
                                     runner.chunk_length(config.steps, config.chunk, problem, mesh), mesh)
    budget = int(distribute.analysis_undercount(mesh) * distribute.program_bytes(compiled))
    # Stage 1's batch passes; the diverse program holds N videos per kernel: it does not fit.
    with pytest.raises(MemoryError, match="a batch of 2 kernels of tiny b with 2 diverse optima each needs .*"
                                          "a smaller --batch .* a smaller --diversity or --dtype bfloat16"):
        pipeline.check_memory(TINY, TINY_PARAMS, JOB, ["b"], budget)


def test_cli_visualize_offers_diversity_and_refuses_a_bad_count_in_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["visualize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--diversity N" in help_text and "docs/diversity.md" in help_text
    for bad in ("1", "99", "x"):
        with pytest.raises(SystemExit):
            cli.main(["visualize", "--diversity", bad])
        err = capsys.readouterr().err
        assert err.startswith("kv3d visualize: error: argument --diversity:") and err.count("\n") == 1, err
        assert ("2 to 64 optima per channel" if bad != "x" else "write a whole number") in err
    assert "--diversity-steps STEPS" in help_text and f"at least {job.DIVERSITY_STEPS}" in help_text
    assert cli.main(["visualize", "--diversity-steps", "300"]) == 2
    assert capsys.readouterr().err == ("kv3d visualize: error: --diversity-steps sets the steps of the diverse "
                                       "optima; add --diversity N\n")


def test_the_diverse_strip_tiles_the_optima_with_white_gaps():
    videos = np.random.default_rng(0).random((3, 2, 4, 5, 3)).astype(np.float32)
    strip = render.side_by_side(videos)
    assert strip.shape == (2, 4, 3 * 5 + 2 * 2, 3)
    for i in range(3):
        np.testing.assert_array_equal(strip[:, :, i * 7:i * 7 + 5], videos[i])
    np.testing.assert_array_equal(strip[:, :, 5:7], 1.0)
    np.testing.assert_array_equal(strip[:, :, 12:14], 1.0)
