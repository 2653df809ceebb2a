import io

from kv3d_jax import progress


def test_the_rate_counts_from_the_first_update_and_the_first_shows_none(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.ProgressBar(40, label="conv3", stream=stream)
    bar.update(10, objective=1.5)
    bar.update(30, objective=2.0)
    first, second = stream.getvalue().splitlines()
    assert first == "conv3 [######------------------] 10/40  objective=1.5"
    assert second == "conv3 [##################------] 30/40  10.00 steps/s  objective=2"
