"""The size of a run's pictures in each media format, and the time to write them.

Reads every kernel record of a finished ``kv3d visualize`` folder (``kernels/{layer}/{channel}.npz``),
writes each kernel's stage-2 pictures (:func:`kv3d_jax.writers.save_decomposition`) once per
format of :data:`kv3d_jax.writers.MEDIA` into ``OUT/{media}/{layer}/``, and prints per format:
the moving pictures' and static PNGs' bytes, the run folder's pages and layer figures added, the
kernel records added, and the wall and CPU time per kernel (ffmpeg's included).

    kv3d visualize --out /tmp/run && python benchmarks/media_sizes.py /tmp/run --out /tmp/media_sizes
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

from kv3d_jax import motion, writers
from kv3d_jax.record import KernelRecord

# The border the job's motion read-out ignores, px (pipeline._BORDER): drawn grey, as in the job.
BORDER = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished kv3d visualize folder")
    parser.add_argument("--out", type=Path, required=True, help="where to write the pictures (replaced)")
    parser.add_argument("--model", default="motionnet", help="the model name in the file names")
    args = parser.parse_args()
    records = sorted((args.run / "kernels").glob("*/*.npz"))
    if not records:
        parser.error(f"{args.run} has no kernels/*/*.npz records")
    pages = [p for p in args.run.rglob("*") if p.is_file() and p.suffix in (".html", ".png")
             and "kernels" not in p.relative_to(args.run).parts and not p.name.endswith("_static.png")]
    pages_bytes = sum(p.stat().st_size for p in pages)
    records_bytes = sum(p.stat().st_size for p in (args.run / "kernels").rglob("*") if p.is_file())
    print(f"{len(records)} kernels; pages + layer figures {pages_bytes / 1e6:.2f} MB; "
          f"kernels/ records {records_bytes / 1e6:.1f} MB")
    kernels = []
    for path in records:
        with np.load(path) as r:
            record = {k: r[k].astype(np.float32) for k in ("video", "static", "displacement")}
        record["reconstruction"] = KernelRecord.reconstruction(record)
        valid = np.asarray(motion.observability(record["static"], record["displacement"], BORDER)) > 0
        kernels.append((path.parent.name, int(path.stem), record, valid))
    for media in writers.MEDIA:
        out = args.out / media
        shutil.rmtree(out, ignore_errors=True)
        start, cpu = time.perf_counter(), os.times()
        for layer, channel, r, valid in kernels:
            writers.save_decomposition(out / layer, writers.kernel_stem(args.model, layer, channel), r["video"],
                                       r["static"], r["displacement"], r["reconstruction"], valid=valid, media=media)
        wall, end = time.perf_counter() - start, os.times()
        cpu_s = sum(getattr(end, f) - getattr(cpu, f) for f in ("user", "system", "children_user", "children_system"))
        files = [p for p in out.rglob("*") if p.is_file()]
        moving = sum(p.stat().st_size for p in files if p.suffix != ".png")
        statics = sum(p.stat().st_size for p in files if p.suffix == ".png")
        total = moving + statics + pages_bytes
        print(f"{media}: {sum(p.suffix != '.png' for p in files)} moving pictures {moving / 1e6:.2f} MB, statics "
              f"{statics / 1e6:.2f} MB; with pages and figures {total / 1e6:.2f} MB, with the records too "
              f"{(total + records_bytes) / 1e6:.1f} MB; {1000 * wall / len(kernels):.0f} ms per kernel "
              f"({1000 * cpu_s / len(kernels):.0f} ms CPU)", flush=True)


if __name__ == "__main__":
    main()
