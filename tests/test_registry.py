"""The model registry: one entry per model, converters found through it, and imports that run one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import converters
from kv3d_jax import models, zoo

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "kv3d_jax").rglob("*.py")), ids=lambda p: p.name)
def test_only_the_loader_and_the_command_line_import_converters(path):
    uses = {name for name in _imports(path) if name == "converters" or name.startswith("converters.")}
    if path.relative_to(ROOT).as_posix() in ("kv3d_jax/zoo.py", "kv3d_jax/cli.py"):
        return
    assert not uses, f"{path.name} imports {uses}"


@pytest.mark.parametrize("first", ["converters", "converters.motionnet", "converters.vqvae", "kv3d_jax.zoo"])
def test_no_import_cycle_whichever_module_comes_first(first):
    proc = subprocess.run([sys.executable, "-c", f"import {first}; import converters, kv3d_jax.zoo"],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", models.names())
def test_every_model_has_one_entry_with_a_converter(name):
    entry = models.entry(name)
    converter = converters.converter(name)
    assert isinstance(converter.CHECKPOINT, str) and callable(converter.convert)
    model = models.get(name)
    assert model.name == name
    shapes = jax.eval_shape(lambda key: models.init_params(name, key), jax.random.key(0))
    assert model.num_channels(shapes, model.layers[0]) >= 1
    assert (entry.embedded is not None) == (name in ("motionnet", "inception_i3d"))


# Modules of the converters package that read or lay out checkpoints for every converter.
CONVERTER_HELPERS = {"__init__", "checkpoint", "common", "torch_layout"}


def test_every_converter_module_is_registered():
    # converters.names() is models.names() by definition; what can drift apart is the package's
    # files and the registry: a converter written but never registered is one `kv3d convert`
    # cannot reach.
    registered = {models.entry(name).converter.partition(":")[0] for name in models.names()}
    written = {f"converters.{p.stem}" for p in (ROOT / "converters").glob("*.py") if p.stem not in CONVERTER_HELPERS}
    assert written == registered, f"not registered: {sorted(written - registered)}; missing: {sorted(registered - written)}"
    assert tuple(converters.formats()) == models.names()


def test_unknown_names_and_configs_are_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet'; valid models are: c3d"):
        models.entry("resnet")
    with pytest.raises(ValueError, match="c3d cannot be built with config {'downsample': 2}"):
        models.get("c3d", {"downsample": 2})
    with pytest.raises(ValueError, match=r"c3d's weights do not ship with kv3d: give its checkpoint \(c3d-pytorch"):
        zoo.load("c3d")
