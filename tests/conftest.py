"""Fixtures shared by several test modules; each expensive object is built once per session."""

from __future__ import annotations

import collections.abc
import contextlib
import io

import jax
import pytest
import torch

import torch_models
from kv3d_jax import cli, runner


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Each worker keeps every program it compiles in one folder of the test session, which its
    later tests and every ``kv3d`` it starts in another interpreter (``KV3D_CACHE``) read back;
    never the user's home (what it saves: tests/README.md). ``test_compilation_cache`` checks the
    cache the way a user meets it, one job per interpreter with a folder of its own."""
    folder = runner.enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KV3D_CACHE", str(folder))
        yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Frees every compiled program after each test module. One pytest process compiles
    thousands of programs; each XLA:CPU executable holds hundreds of memory mappings, and at
    Linux's 65,530 per process compiling aborts the run."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def torch_c3d() -> torch_models.C3D:
    """c3d-pytorch's C3D with PyTorch's default random init (non-zero biases), in eval mode."""
    torch.manual_seed(0)
    return torch_models.C3D().eval()


class _MadeOnFirstUse(collections.abc.Mapping):
    """A mapping of ``keys`` whose value for a key is ``make(key)``, made when first looked up: a
    worker that needs one C3D format does not write and convert the other's 320 MB."""

    def __init__(self, keys, make):
        self._keys, self._make, self._made = tuple(keys), make, {}

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._made:
            self._made[key] = self._make(key)
        return self._made[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


@pytest.fixture(scope="session")
def c3d_checkpoints(torch_c3d, tmp_path_factory) -> collections.abc.Mapping:
    """``torch_c3d``'s state dict saved by torch.save as ``{"torch-zip": path, "torch-legacy": path}``."""
    folder = tmp_path_factory.mktemp("c3d_checkpoints")
    names = {"torch-zip": "c3d.pt", "torch-legacy": "c3d.pickle"}

    def save(fmt):
        torch.save(torch_c3d.state_dict(), folder / names[fmt], _use_new_zipfile_serialization=fmt == "torch-zip")
        return folder / names[fmt]

    return _MadeOnFirstUse(names, save)


@pytest.fixture(scope="session")
def c3d_params_files(c3d_checkpoints, tmp_path_factory) -> collections.abc.Mapping:
    """Each of ``c3d_checkpoints`` through ``kv3d convert c3d``: ``{format: (params path, stdout)}``."""
    folder = tmp_path_factory.mktemp("c3d_params")

    def convert(fmt):
        path, stdout = folder / f"{fmt}.msgpack", io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert cli.main(["convert", "c3d", str(c3d_checkpoints[fmt]), "-o", str(path)]) == 0
        return path, stdout.getvalue()

    return _MadeOnFirstUse(tuple(c3d_checkpoints), convert)


@pytest.fixture(scope="session")
def kv3d_runner():
    """One interpreter that imported kv3d, forking a child per ``kv3d`` command and measuring it
    (status, output, peak memory, CPU): see ``tests/hostile_harness.py``."""
    import hostile_harness

    runner = hostile_harness.Runner()
    yield runner
    runner.close()
