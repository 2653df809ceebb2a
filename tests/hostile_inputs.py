"""Hostile inputs to every door of kv3d beyond ``kv3d convert``'s checkpoints, generated at test time.

Each builder writes its files into ``folder`` and returns ``(argv, problem)``: the ``kv3d`` command
line that reads them (its output folder, if any, is ``folder/out``) and a regular expression its
one-line refusal must match. The classes follow issue #27: files written outside ``--out``,
aborts on sizes, non-finite or invalid weights, floods and hangs, memory amplification, and
messages that are not one clean line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import jax
import msgpack
import numpy as np
import torch
from PIL import Image

import hostile_checkpoints
from converters import torch_layout, vqvae as vqvae_converter
from kv3d_jax import params_io
from kv3d_jax.models import vqvae

# A VideoGPT encoder small enough to build in a test: one residual layer (so BatchNorms), 4 channels.
SMALL_VQVAE = {"n_hiddens": 4, "n_res_layers": 1, "downsample": (4, 1, 1), "sequence_length": 4, "resolution": 4}


def _config(args: dict) -> dict:
    return {"n_hiddens": args["n_hiddens"], "n_res_layers": args["n_res_layers"], "downsample": list(args["downsample"]),
            "input_shape": [args["sequence_length"], args["resolution"], args["resolution"]]}


def small_vqvae_params() -> dict:
    """Random Flax variables (uniform in [0.5, 1.5)) of the :data:`SMALL_VQVAE` encoder, as writable numpy
    arrays; made from the variables' shapes, so nothing is compiled."""
    template = torch_layout.template_of(lambda key: vqvae.init_params(key, **_config(SMALL_VQVAE)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32), template)


def vqvae_checkpoint(path: Path, args: dict, state: dict | None = None) -> Path:
    """A VideoGPT Lightning ``.ckpt`` with hyper-parameters ``args`` and the encoder ``state`` (default:
    random tensors of the :data:`SMALL_VQVAE` encoder)."""
    if state is None:
        template = torch_layout.template_of(lambda key: vqvae.init_params(key, **_config(SMALL_VQVAE)))
        shapes = torch_layout.expected_shapes(template, vqvae_converter.torch_path)
        generator = torch.Generator().manual_seed(0)
        state = {name: torch.rand(shape, generator=generator) + 0.5 for name, shape in shapes.items()}
    torch.save({"state_dict": state, "hyper_parameters": {"args": argparse.Namespace(**args)}}, path)
    return path


def motionnet_params() -> dict:
    """MotionNet's shipped weights as Flax variables of numpy arrays (writable copies)."""
    from kv3d_jax import zoo

    return jax.tree.map(np.array, zoo.load("motionnet")[1])


def _out(folder: Path) -> str:
    return str(folder / "out")


# ---------------------------------------------------------------- files written outside --out


def _stage1_npz(path: Path, model: str, layer: str, videos=None, **extra) -> Path:
    videos = np.full((1, 2, 4, 4, 3), 0.5, np.float32) if videos is None else videos
    np.savez(path, videos=videos, model=np.asarray(model), layer=np.asarray(layer),
             channels=np.arange(len(videos)), objective=np.zeros(len(videos)), **extra)
    return path


def npz_layer_escapes(folder):
    """A stage-1 .npz whose layer climbs out of --out: '/../../../escaped'."""
    npz = _stage1_npz(folder / "s.npz", "motionnet", "/../../../escaped")
    return ["decompose", npz, "--out", _out(folder), "--steps", "0"], r"names layer '/\.\./\.\./\.\./escaped'"


def npz_model_absolute(folder):
    """A stage-1 .npz whose model is an absolute path (it would replace --out entirely)."""
    npz = _stage1_npz(folder / "s.npz", str(folder / "elsewhere"), "conv1")
    return ["decompose", npz, "--out", _out(folder), "--steps", "0"], r"names model '/[^']*\.\.\.', which kv3d does not know"


# ---------------------------------------------------------------- sizes that reached XLA


def npz_zero_axis(folder):
    npz = _stage1_npz(folder / "s.npz", "motionnet", "conv1", videos=np.zeros((1, 0, 8, 8, 3), np.float32))
    return ["decompose", npz, "--out", _out(folder), "--steps", "0"], "holds 0 frames of 8x8 pixels; kv3d decompose needs"


def gif_zero_width(folder):
    """A GIF whose screen and only frame are 0 pixels wide."""
    gif = folder / "flat.gif"
    gif.write_bytes(b"GIF89a" + struct.pack("<HHBBB", 0, 4, 0x80, 0, 0) + bytes(6)
                    + b"\x2c" + struct.pack("<HHHHB", 0, 0, 0, 4, 0) + b"\x02\x01\x00\x00;")
    return ["decompose", gif, "--out", _out(folder), "--steps", "0"], "holds 1 frames of 4x0 pixels"


def vqvae_huge_clips_ckpt(folder):
    """VideoGPT's sequence_length and resolution 2^40: converted with exit 0 before, then aborted XLA."""
    ckpt = vqvae_checkpoint(folder / "v.ckpt", {**SMALL_VQVAE, "sequence_length": 2**40, "resolution": 2**40})
    return (["convert", "videogpt_vqvae", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"clips of \(1099511627776, 1099511627776, 1099511627776\) .* at most 64 frames")


def _vqvae_params_file(path: Path, config: dict, params=None) -> Path:
    params = small_vqvae_params() if params is None else params
    params_io.save(path, params, "videogpt_vqvae", _config(SMALL_VQVAE))
    data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    data[params_io.METADATA] = json.dumps({"model": "videogpt_vqvae", "config": config})
    path.write_bytes(msgpack.packb(data, use_bin_type=True))
    return path


def vqvae_huge_clips_params_tuning(folder):
    """A params file recording clips of 2^40 x 2^40 x 2^40, given to kv3d tuning."""
    params = _vqvae_params_file(folder / "p.msgpack", {**_config(SMALL_VQVAE), "input_shape": [2**40] * 3})
    return (["tuning", "--model", "videogpt_vqvae", "--weights", params, "--layer", "encoder", "--out", _out(folder)],
            "clips of .* at most 64 frames")


def vqvae_many_res_layers_params(folder):
    """n_res_layers 10^6 from a params file: grew past 1.2 GB and never finished."""
    params = _vqvae_params_file(folder / "p.msgpack", {**_config(SMALL_VQVAE), "n_res_layers": 10**6})
    return ["layers", "videogpt_vqvae", params], r"n_res_layers=1000000: must be an integer from 0 to 16"


def vqvae_huge_n_hiddens_ckpt(folder):
    """n_hiddens of 100,000 digits: its repr alone is refused by Python, its message 100 kB."""
    ckpt = vqvae_checkpoint(folder / "v.ckpt", {**SMALL_VQVAE, "n_hiddens": 10**100_000})
    return (["convert", "videogpt_vqvae", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"n_hiddens=<an integer of 332,193 bits>")


# ---------------------------------------------------------------- values the model cannot use


def float64_overflow(folder):
    """A float64 tensor holding 1e300: finite in float64, inf once cast to float32."""
    state = {k: v.numpy().astype(np.float64) for k, v in hostile_checkpoints.motionnet_state().items()}
    state["conv2.bias"][5] = 1e300
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickle.dumps({"blobs": state}, protocol=2))
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"1 tensor of motionnet hold non-finite values: conv2\.bias \(1 inf in float32\)")


def negative_variance_ckpt(folder):
    """A BatchNorm running_var of -1 (every later activation would be NaN)."""
    template = torch_layout.template_of(lambda key: vqvae.init_params(key, **_config(SMALL_VQVAE)))
    shapes = torch_layout.expected_shapes(template, vqvae_converter.torch_path)
    state = {name: torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 0.5 for name, shape in shapes.items()}
    state["encoder.res_stack.0.block.3.running_var"][1] = -1.0
    ckpt = vqvae_checkpoint(folder / "v.ckpt", SMALL_VQVAE, state)
    return (["convert", "videogpt_vqvae", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"batch_stats/encoder_res_stack_0_block_3/var is a BatchNorm variance with 1 negative values")


def _motionnet_params_file(path: Path, change) -> Path:
    params = motionnet_params()
    change(params)
    params_io.save(path, params, "motionnet")
    return path


def nan_params_file(folder):
    def change(params):
        params["params"]["conv3"]["kernel"][0, 0, 0, 0, :3] = np.nan

    path = _motionnet_params_file(folder / "p.msgpack", change)
    return (["visualize", "--weights", path, "--layer", "conv1", "--out", _out(folder)],
            r"params/conv3/kernel holds 3 NaN")


def complex_params_file(folder):
    def change(params):
        params["params"]["fc"]["bias"] = params["params"]["fc"]["bias"].astype(np.complex64)

    path = _motionnet_params_file(folder / "p.msgpack", change)
    return ["layers", "motionnet", path], r"params/fc/bias is complex64, not real floating-point values"


def integer_params_file(folder):
    def change(params):
        params["params"]["conv1"]["bias"] = np.zeros(16, np.int32)

    path = _motionnet_params_file(folder / "p.msgpack", change)
    return ["layers", "motionnet", path], r"params/conv1/bias is int32, not real floating-point values"


def negative_variance_params_file(folder):
    params = small_vqvae_params()
    params["batch_stats"]["encoder_res_stack_1"]["var"][0] = -2.0
    path = folder / "p.msgpack"
    params_io.save(path, params, "videogpt_vqvae", _config(SMALL_VQVAE))
    return (["visualize", "--model", "videogpt_vqvae", "--weights", path, "--layer", "encoder", "--out",
             _out(folder)], r"batch_stats/encoder_res_stack_1/var is a BatchNorm variance with 1 negative")


# ---------------------------------------------------------------- hangs and floods


def _crafted_pickle(path: Path, history: bytes) -> Path:
    """A protocol-2 pickle ``{'blobs': {}, 'history': <history's opcodes>}``."""
    path.write_bytes(b"\x80\x02}(X\x05\x00\x00\x00blobs}X\x07\x00\x00\x00history" + history + b"u.")
    return path


def int_key_flood(folder):
    """One 1 MiB integer, memoised once and used as the key of 20,000 dicts (each hash reads it all)."""
    big = (1 << (8 << 20)) - 1
    raw = big.to_bytes((big.bit_length() + 8) // 8, "little", signed=True)
    first = b"}\x8b" + struct.pack("<i", len(raw)) + raw + b"q\x00K\x01s"
    ckpt = _crafted_pickle(folder / "w.pkl", b"(" + first + b"}h\x00K\x01s" * 20_000 + b"l")
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"a dict or set key is <an integer of 8,388,608 bits>")


def int_shape(folder):
    """An array whose shape is 32 integers of 1 Mbit each (multiplying them took 13-34 s)."""
    big = 1 << (1 << 20)
    value = hostile_checkpoints.Reduces(hostile_checkpoints._RECONSTRUCT, (np.ndarray, (0,), b"b"),
                                        (1, (big,) * 32, np.dtype("f4"), False, b""))
    state = {k: v.numpy() for k, v in hostile_checkpoints.motionnet_state().items()}
    state["conv1.bias"] = value
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickle.dumps({"blobs": state}, protocol=2))
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            "an array's shape a tuple is not a tuple of at most 32 integers")


def ordered_dict_repeat(folder):
    """OrderedDict called 60,000 times on one memoised list of 100,000 pairs: 6e9 items copied."""
    pickled = (b"\x80\x02ccollections\nOrderedDict\nq\x00" + b"X\x01\x00\x00\x00aK\x01\x86q\x010"
               + b"](" + b"h\x01" * 100_000 + b"e\x85q\x020" + b"h\x00h\x02R0" * 60_000 + b"N.")
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickled)
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            "its calls and states copy more than 5,000,000 items in all")


def namespace_state_repeat(folder):
    """One Namespace given the same 100,000-entry state 140,000 times."""
    keys = b"".join(b"X" + struct.pack("<I", len(k)) + k + b"K\x01" for k in (b"k%d" % i for i in range(100_000)))
    pickled = (b"\x80\x02cargparse\nNamespace\n)\x81" + b"}q\x01(" + keys + b"u0"
               + b"h\x01b" * 140_000 + b".")
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickled)
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            "its calls and states copy more than 5,000,000 items in all")


def long_gif(folder):
    """300,000 frames of 2x2 pixels in 4.5 MB: inside the pixel budget, minutes of decoding."""
    buffer = io.BytesIO()
    Image.new("P", (2, 2), 0).save(buffer, format="GIF")
    data = buffer.getvalue()
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen, colour table
    gif = folder / "long.gif"
    gif.write_bytes(data[:-1] + data[start:-1] * 299_999 + b";")
    return ["decompose", gif, "--out", _out(folder), "--steps", "0"], "holds 1,025 frames, more than the 1,024"


def _small_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def gif_name_with_newline(folder):
    """A GIF whose file name holds a newline: refused before any decomposition, not when writing."""
    source = folder / "gifs"
    source.mkdir()
    (source / "fine.gif").write_bytes(_small_gif())
    (source / "bad\nname.gif").write_bytes(_small_gif())
    return (["decompose", source, "--out", _out(folder), "--steps", "0"],
            r"will not write a file named 'bad\\nname_stage1.gif'")


def many_gifs(folder):
    source = folder / "gifs"
    source.mkdir()
    data = _small_gif()
    for i in range(4097):
        (source / f"{i}.gif").write_bytes(data)
    return ["decompose", source, "--out", _out(folder), "--steps", "0"], "holds more than 4,096 GIFs"


def fifo_gif(folder):
    """A named pipe called x.gif: opening it for reading blocks forever."""
    os.mkfifo(folder / "x.gif")
    return ["decompose", folder / "x.gif", "--out", _out(folder), "--steps", "0"], "is a named pipe; kv3d reads regular"


def fifo_checkpoint(folder):
    os.mkfifo(folder / "w.ckpt")
    return ["convert", "motionnet", folder / "w.ckpt", "-o", folder / "out" / "p.msgpack"], "is a named pipe"


def fifo_params(folder):
    os.mkfifo(folder / "p.msgpack")
    return (["tuning", "--weights", folder / "p.msgpack", "--layer", "conv1", "--out", _out(folder)],
            "is a named pipe")


def tuning_directions(folder):
    return ["tuning", "--layer", "conv1", "--directions", "100000000", "--out", _out(folder)], "from 2 to 360"


def memory_budget_inf(folder):
    return (["visualize", "--layer", "conv1", "--memory-budget", "inf", "--out", _out(folder)],
            "--memory-budget must be a positive, finite number of GiB")


# ---------------------------------------------------------------- memory amplification


def small_member_total(folder):
    """300 zip members of 1 MiB each, deflated to about 1 kB: 300 MiB from a 330 kB file."""
    source = hostile_checkpoints.save("torch-zip", folder / "src.pt", hostile_checkpoints.motionnet_state())
    members = hostile_checkpoints.read_zip_members(source)
    source.unlink()
    prefix = next(n for n in members if n.endswith("data.pkl"))[: -len("data.pkl")]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    stream = compressor.compress(zeros) + compressor.flush()
    for i in range(300):
        members[f"{prefix}extra/{i}"] = (stream, zipfile.ZIP_DEFLATED, (len(zeros), zlib.crc32(zeros)), 0)
    ckpt = hostile_checkpoints.write_zip(folder / "w.pt", members)
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"its zip members declare [0-9,]+ bytes in all from a [0-9,]+-byte file")


def shared_buffer(folder):
    """One 1 MiB bytes object shared by 500 arrays (500 MiB once each is copied)."""
    raw = bytes(1 << 20)
    arrays = [hostile_checkpoints.Reduces(hostile_checkpoints._RECONSTRUCT, (np.ndarray, (0,), b"b"),
                                          (1, (1 << 18,), np.dtype("f4"), False, raw)) for _ in range(500)]
    state = {k: v.numpy() for k, v in hostile_checkpoints.motionnet_state().items()}
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickle.dumps({"blobs": state, "history": arrays}, protocol=4))
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"its arrays and byte strings add up to more than")


def huge_key_message(folder):
    """A 10 MB dict key: the refusal quotes a short prefix of it, not all of it."""
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickle.dumps({"k" * 10_000_000: 1, "lr": 0.1}, protocol=4))
    return (["convert", "motionnet", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"keys 'k{20,60}\.\.\.', 'lr', but neither")


def msgpack_map_flood(folder):
    """8 million empty msgpack maps in 8 MB (1.6 GB once built)."""
    n = 8_000_000
    payload = (b"\x82" + msgpack.packb("params") + b"\xdd" + struct.pack(">I", n) + b"\x80" * n
               + msgpack.packb(params_io.METADATA) + msgpack.packb(json.dumps({"model": "motionnet", "config": {}})))
    path = folder / "p.msgpack"
    path.write_bytes(payload)
    return ["layers", "motionnet", path], "it holds more than 100,000 maps and arrays"


def npz_huge_name_member(folder):
    """A stage-1 .npz whose 'model' is one string of 50 million characters (200 MB once read), deflated."""
    npz = folder / "s.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<U50000000", "fortran_order": False, "shape": ()})
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, value in (("videos", np.zeros((1, 2, 4, 4, 3), np.float32)), ("layer", np.asarray("conv1")),
                            ("channels", np.arange(1))):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, value)
        with archive.open("model.npy", "w", force_zip64=False) as member:
            member.write(header.getvalue())
            zeros = bytes(1 << 24)
            for _ in range(11):
                member.write(zeros)
            member.write(bytes(200_000_000 - 11 * len(zeros)))
    return ["decompose", npz, "--out", _out(folder), "--steps", "0"], r"'model' is <U50000000\[\], not a name"


def npz_non_finite(folder):
    videos = np.full((1, 2, 4, 4, 3), 0.5)
    videos[0, 1, 2, 2, 0] = 1e300
    npz = _stage1_npz(folder / "s.npz", "motionnet", "conv1", videos=videos)
    return ["decompose", npz, "--out", _out(folder), "--steps", "0"], "holds 1 values that are not finite"


# ---------------------------------------------------------------- not one clean line


def caffe2_integer_blob_names(folder):
    blobs = {k.replace(".", "_"): v.numpy() for k, v in hostile_checkpoints.motionnet_state().items()}
    blobs[12345] = np.zeros(3, np.float32)
    ckpt = folder / "w.pkl"
    ckpt.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    return (["convert", "i3d_r50", ckpt, "-o", folder / "out" / "p.msgpack"],
            r"the checkpoint has a blob named 12345: not an I3D")


def msgpack_odd_leaf(folder):
    path = folder / "p.msgpack"
    path.write_bytes(msgpack.packb({"params": {"conv1": {"kernel": 5}}}))
    return ["layers", "motionnet", path], r"it holds a int at 'params/conv1/kernel', where arrays belong"


def msgpack_chunk_without_shape(folder):
    path = folder / "p.msgpack"
    path.write_bytes(msgpack.packb({"params": {"__msgpack_chunked_array__": True, "chunks": {}}}))
    return ["layers", "motionnet", path], r"its chunked array at 'params' is not a shape"


def argument_newline(folder):
    """An argument that forges a traceback on the next line of the error."""
    return (["decompose", "a.gif", "--out", _out(folder), "x\nTraceback (most recent call last):\n  File"],
            r"unrecognized arguments: x\\nTraceback")


def layer_newline(folder):
    return (["maximize", "--layer", "conv1\nTraceback (most recent call last):", "--out", _out(folder)],
            r"has no layer 'conv1\\nTraceback \(most recent call last\):'; valid layers")


CASES = {
    "npz-layer-escapes": npz_layer_escapes, "npz-model-absolute": npz_model_absolute,
    "npz-zero-axis": npz_zero_axis, "gif-zero-width": gif_zero_width,
    "vqvae-huge-clips-ckpt": vqvae_huge_clips_ckpt, "vqvae-huge-clips-params-tuning": vqvae_huge_clips_params_tuning,
    "vqvae-many-res-layers": vqvae_many_res_layers_params, "vqvae-huge-n-hiddens": vqvae_huge_n_hiddens_ckpt,
    "float64-overflow": float64_overflow, "negative-variance-ckpt": negative_variance_ckpt,
    "nan-params": nan_params_file, "complex-params": complex_params_file, "integer-params": integer_params_file,
    "negative-variance-params": negative_variance_params_file,
    "ordered-dict-repeat": ordered_dict_repeat, "namespace-state-repeat": namespace_state_repeat,
    "int-key-flood": int_key_flood, "int-shape": int_shape, "long-gif": long_gif,
    "gif-name-with-newline": gif_name_with_newline, "many-gifs": many_gifs, "fifo-gif": fifo_gif, "fifo-checkpoint": fifo_checkpoint, "fifo-params": fifo_params,
    "tuning-directions": tuning_directions, "memory-budget-inf": memory_budget_inf,
    "small-member-total": small_member_total, "shared-buffer": shared_buffer, "huge-key-message": huge_key_message,
    "msgpack-map-flood": msgpack_map_flood, "npz-huge-name-member": npz_huge_name_member,
    "npz-non-finite": npz_non_finite,
    "caffe2-integer-blob-names": caffe2_integer_blob_names, "msgpack-odd-leaf": msgpack_odd_leaf,
    "msgpack-chunk-without-shape": msgpack_chunk_without_shape, "argument-newline": argument_newline,
    "layer-newline": layer_newline,
}
