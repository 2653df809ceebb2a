"""kv3d_jax: what a 3D convolution has learned, for every channel of a layer at once."""

import importlib

# Where each public name lives. They are imported on first use (PEP 562), so that importing one
# submodule (e.g. kv3d_jax.writers to write a GIF) does not import the models and all three stages.
_EXPORTS = {
    "decompose": "kv3d_jax.decomposition",
    "maximize": "kv3d_jax.maximization",
    "maximize_diverse": "kv3d_jax.diversity",
    "models": "kv3d_jax.models",
    "motion_summary": "kv3d_jax.motion",
    "refine": "kv3d_jax.refinement",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kv3d_jax' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "models" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
