"""The ``kv3d`` command line. Each subcommand is one ``_add_<name>(subparsers)`` function."""

from __future__ import annotations

import argparse
import sys

import flax
import jax

import converters
from kv3d_jax import models, params_io


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv3d", description="Visualise what the kernels of a 3D CNN have learned."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kv3d`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"kv3d {args.command}: error: {err}", file=sys.stderr)
        return 2


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PyTorch or Caffe2 checkpoint into a kv3d params file",
        description="Reads CHECKPOINT (PyTorch zip, legacy torch.save or Caffe2 pickle, "
        "detected from the file; no code in it is run), checks it holds exactly MODEL's "
        "tensors and writes them as a params file. Checkpoints: "
        + "; ".join(f"{name}: {what}" for name, what in converters.formats().items()),
    )
    p.add_argument("model", help=f"model name: {', '.join(converters.names())}")
    p.add_argument("checkpoint", help="the checkpoint file")
    p.add_argument("-o", "--output", required=True, help="params file to write (Flax msgpack)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    params = converters.convert(args.model, args.checkpoint)
    params_io.save(args.output, params)
    leaves = jax.tree.leaves(params)
    fmt = converters.checkpoint.FORMATS[converters.checkpoint_format(args.checkpoint)]
    print(
        f"converted {args.checkpoint} ({fmt}) for {args.model}: {len(leaves)} tensors, "
        f"{sum(leaf.size for leaf in leaves):,} parameters -> {args.output}"
    )
    return 0


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers (with channel counts given params)")
    p.add_argument("model", help=f"model name: {', '.join(models.names())}")
    p.add_argument("params", nargs="?", help="a params file from `kv3d convert`, to show channel counts")
    p.set_defaults(run=_run_layers)


def _run_layers(args) -> int:
    model = models.get(args.model)
    if args.params is None:
        print("\n".join(model.layers))
        return 0
    params = params_io.load(args.params)
    try:
        channels = [model.num_channels(params, layer) for layer in model.layers]
    except flax.errors.FlaxError as err:
        raise ValueError(f"{args.params} does not hold {args.model} params: {err}") from None
    width = max(map(len, model.layers))
    for layer, n in zip(model.layers, channels):
        print(f"{layer:<{width}}  {n} channels")
    return 0


_SUBCOMMANDS: list = [_add_convert, _add_layers]

if __name__ == "__main__":
    sys.exit(main())
