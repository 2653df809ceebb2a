"""Fixtures shared by several test modules; each expensive object is built once per session."""

from __future__ import annotations

import contextlib
import io

import jax
import pytest
import torch

import torch_models
from kv3d_jax import cli


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Every ``kv3d`` a test starts in another interpreter keeps its compiled programs in one folder
    of the test session (``KV3D_CACHE``), not in the user's home. In this process JAX's cache is
    off: the tests compile thousands of programs that no later run reads back, and
    ``test_compilation_cache`` checks the cache the way a user meets it, one job per interpreter."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KV3D_CACHE", str(tmp_path_factory.mktemp("xla_cache")))
        enabled = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        yield
        jax.config.update("jax_enable_compilation_cache", enabled)


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


@pytest.fixture(scope="session")
def c3d_checkpoints(torch_c3d, tmp_path_factory) -> dict:
    """``torch_c3d``'s state dict saved by torch.save as ``{"torch-zip": path, "torch-legacy": path}``."""
    folder = tmp_path_factory.mktemp("c3d_checkpoints")
    paths = {"torch-zip": folder / "c3d.pt", "torch-legacy": folder / "c3d.pickle"}
    torch.save(torch_c3d.state_dict(), paths["torch-zip"])
    torch.save(torch_c3d.state_dict(), paths["torch-legacy"], _use_new_zipfile_serialization=False)
    return paths


@pytest.fixture(scope="session")
def c3d_params_files(c3d_checkpoints, tmp_path_factory) -> dict:
    """Each of ``c3d_checkpoints`` through ``kv3d convert c3d``: ``{format: (params path, stdout)}``."""
    folder = tmp_path_factory.mktemp("c3d_params")
    converted = {}
    for fmt, checkpoint in c3d_checkpoints.items():
        path, stdout = folder / f"{fmt}.msgpack", io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert cli.main(["convert", "c3d", str(checkpoint), "-o", str(path)]) == 0
        converted[fmt] = (path, stdout.getvalue())
    return converted


@pytest.fixture(scope="session")
def kv3d_runner():
    """One interpreter that imported kv3d, forking a child per ``kv3d`` command and measuring it
    (status, output, peak memory, CPU): see ``tests/hostile_harness.py``."""
    import hostile_harness

    runner = hostile_harness.Runner()
    yield runner
    runner.close()
