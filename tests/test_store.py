"""The results store: run records, durable kernel files, and what happens to files that do not belong."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from kv3d_jax import job
from kv3d_jax import store as store_lib
from kv3d_jax.store import Store, StoreError

from tiny_model import tiny

SCHEMA = {"video": ((2, 4, 4, 3), "float32"), "objective": ((), "float32")}
CONFIG = {"model": "m", "steps": 3, "shape": (2, 4, 4)}


def _record(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"video": rng.random((2, 4, 4, 3), dtype=np.float32), "objective": np.float32(seed)}


@pytest.fixture
def run(tmp_path):
    with Store.open(tmp_path / "run", CONFIG, "abc") as store:
        yield store


def test_params_checksum_depends_on_values_dtypes_and_names_not_on_order():
    a = {"params": {"conv": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}}
    reordered = {"params": {"conv": {"bias": np.zeros(3, np.float32), "kernel": np.ones((2, 3), np.float32)}}}
    nudged = jax.tree.map(np.copy, a)
    nudged["params"]["conv"]["kernel"][1, 2] = np.nextafter(np.float32(1), np.float32(2))
    retyped = {"params": {"conv": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.int32)}}}
    renamed = {"params": {"conv2": a["params"]["conv"]}}
    checksum = store_lib.params_checksum(a)
    assert checksum == store_lib.params_checksum(reordered)
    assert checksum == store_lib.params_checksum(jax.tree.map(jax.numpy.asarray, a))
    for other in (nudged, retyped, renamed):
        assert store_lib.params_checksum(other) != checksum


def test_run_record_holds_config_checksum_and_versions(run):
    record = json.loads((run.root / "run.json").read_text())
    assert record["config"] == {"model": "m", "steps": 3, "shape": [2, 4, 4]}
    assert record["params_sha256"] == "abc"
    assert record["versions"]["jax"] == jax.__version__
    assert set(record["versions"]) >= {"jax", "flax", "optax", "numpy", "kv3d-jax"}


def test_reopening_with_the_same_settings_keeps_results(tmp_path):
    with Store.open(tmp_path, CONFIG, "abc") as store:
        store.write("conv1", 0, _record(0))
    with Store.open(tmp_path, dict(CONFIG), "abc") as store:
        assert store.audit("conv1", SCHEMA).done == {0}
        assert store.notes == ()


@pytest.mark.parametrize(
    "config, checksum, expected",
    [
        ({**CONFIG, "steps": 4}, "abc", "steps: 3 there, 4 now"),
        ({**CONFIG, "seed": 1}, "abc", "seed: '(not set)' there, 1 now"),
        (CONFIG, "abd", "model params: sha256 abc… there, abd… now"),
    ],
)
def test_reopening_with_other_settings_is_refused_naming_the_difference(tmp_path, config, checksum, expected):
    Store.open(tmp_path, CONFIG, "abc").close()
    with pytest.raises(StoreError, match="other settings") as err:
        Store.open(tmp_path, config, checksum)
    assert expected in str(err.value) and "another run folder" in str(err.value)


def test_other_package_versions_are_a_note_not_an_error(tmp_path):
    Store.open(tmp_path, CONFIG, "abc").close()
    record = json.loads((tmp_path / "run.json").read_text())
    record["versions"]["jax"] = "0.0.1"
    (tmp_path / "run.json").write_text(json.dumps(record))
    with Store.open(tmp_path, CONFIG, "abc") as store:
        assert len(store.notes) == 1 and "'0.0.1' there" in store.notes[0]


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreError, match="not empty and holds no run.json"):
        Store.open(tmp_path, CONFIG, "abc")
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.jpg"]
    with pytest.raises(StoreError, match="is a file, not a folder"):
        Store.open(tmp_path / "holiday.jpg", CONFIG, "abc")


def test_an_unreadable_run_record_is_refused(tmp_path):
    Store.open(tmp_path, CONFIG, "abc").close()
    (tmp_path / "run.json").write_text('{"config": ')
    with pytest.raises(StoreError, match="is not a kv3d run record"):
        Store.open(tmp_path, CONFIG, "abc")


def test_one_writer_at_a_time(tmp_path):
    first = Store.open(tmp_path, CONFIG, "abc")
    with pytest.raises(StoreError, match="another kv3d process is writing"):
        Store.open(tmp_path, CONFIG, "abc")
    first.close()
    Store.open(tmp_path, CONFIG, "abc").close()


def test_a_kernel_round_trips_and_is_never_rewritten(run):
    record = _record(7)
    path = run.write("conv1", 7, record)
    assert path == run.root / "kernels" / "conv1" / "7.npz"
    read = run.read("conv1", 7, SCHEMA)
    assert set(read) == set(SCHEMA)
    np.testing.assert_array_equal(read["video"], record["video"])
    assert read["objective"] == np.float32(7)
    stat = path.stat()
    with pytest.raises(StoreError, match="never rewritten"):
        run.write("conv1", 7, _record(8))
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == ["7.npz"]


def _damage(folder, name: str, how: str) -> None:
    path = folder / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif how == "flipped":  # one bit of the video's data: the zip's CRC-32 catches it
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 1
        path.write_bytes(bytes(data))


def test_audit_quarantines_bad_kernel_files_and_reports_foreign_ones(run):
    for channel in range(7):
        run.write("conv1", channel, _record(channel))
    folder = run.root / "kernels" / "conv1"
    truncated_bytes = folder.joinpath("1.npz").read_bytes()[:-40]
    _damage(folder, "1.npz", "truncated")
    _damage(folder, "2.npz", "garbage")
    _damage(folder, "6.npz", "flipped")
    np.savez(folder / "3.npz", video=np.zeros((2, 4, 5, 3), np.float32), objective=np.float32(0),
             layer=np.asarray("conv1"), channel=np.asarray(3))
    folder.joinpath("4.npz").write_bytes(folder.joinpath("0.npz").read_bytes())  # channel 0's record
    np.savez(folder / "5.npz", video=np.zeros((2, 4, 4, 3), np.float32),
             layer=np.asarray("conv1"), channel=np.asarray(5))
    for name in ("notes.txt", "0.npz.bak", "07.npz"):
        folder.joinpath(name).write_text("x")
    folder.joinpath(".7.npz.tmp4242").write_bytes(b"half a file")

    audit = run.audit("conv1", SCHEMA)

    assert audit.done == {0}
    by_name = {p.path.name: p for p in audit.problems}
    assert set(by_name) == {"1.npz", "2.npz", "3.npz", "4.npz", "5.npz", "6.npz", "notes.txt", "0.npz.bak", "07.npz",
                            ".7.npz.tmp4242"}
    assert "unreadable kernel file" in by_name["1.npz"].reason
    assert "unreadable kernel file" in by_name["2.npz"].reason
    assert "Bad CRC-32" in by_name["6.npz"].reason
    assert "video is float32[2, 4, 5, 3], expected float32[2, 4, 4, 3]" in by_name["3.npz"].reason
    assert "records kernel ('conv1', 0), not ('conv1', 4)" in by_name["4.npz"].reason
    assert "arrays objective missing" in by_name["5.npz"].reason
    for name in ("1.npz", "2.npz", "3.npz", "4.npz", "5.npz", "6.npz"):
        assert by_name[name].action == "quarantined"
        assert not (folder / name).exists()
        assert by_name[name].moved_to.parent == run.root / "quarantine" / "conv1"
    assert by_name["1.npz"].moved_to.read_bytes() == truncated_bytes
    for name in ("notes.txt", "0.npz.bak", "07.npz"):
        assert by_name[name].action == "ignored" and (folder / name).read_text() == "x"
    assert by_name[".7.npz.tmp4242"].action == "removed" and not (folder / ".7.npz.tmp4242").exists()
    assert "quarantined to" in str(by_name["2.npz"])

    # A quarantined kernel can be computed again, and a second bad copy does not clobber the first.
    run.write("conv1", 2, _record(2))
    _damage(folder, "2.npz", "garbage")
    again = run.audit("conv1", SCHEMA)
    assert again.done == {0}
    assert sorted(p.name for p in (run.root / "quarantine" / "conv1").iterdir() if p.name.startswith("2.")) == [
        "2.npz.0", "2.npz.1"]


def test_entries_that_are_no_layer_folder_are_reported(run):
    run.write("conv1", 0, _record(0))
    (run.root / "kernels" / "conv9").mkdir()
    (run.root / "kernels" / "list.txt").write_text("x")
    problems = run.foreign_entries(("conv1", "conv2"))
    assert [(p.path.name, p.action) for p in problems] == [("conv9", "ignored"), ("list.txt", "ignored")]
    assert (run.root / "kernels" / "list.txt").read_text() == "x"


@pytest.mark.parametrize("setting, value, shown", [("slowfast", 1000.0, "1000.0"), ("diversity", 2, "2")])
def test_a_later_setting_is_recorded_only_when_used_so_older_run_folders_still_open(tmp_path, setting, value, shown):
    model, _ = tiny((4, 8, 8), features=3)
    off = job.Job(model="tiny", preset="native", steps=4, decompose_steps=2)
    on = dataclasses.replace(off, **{setting: value})
    old = json.loads(json.dumps(off.config(model)))
    assert setting not in old and job.Job.from_config(old) == off
    recorded = json.loads(json.dumps(on.config(model)))
    assert recorded[setting] == value and job.Job.from_config(recorded) == on
    # A folder whose run.json predates the setting opens for the same job without it ...
    Store.open(tmp_path, old, "checksum").close()
    with Store.open(tmp_path, off.config(model), "checksum"):
        pass
    # ... and not for one with it, whose records hold more.
    with pytest.raises(StoreError, match=f"{setting}: '\\(not set\\)' there, {shown} now"):
        Store.open(tmp_path, on.config(model), "checksum")
