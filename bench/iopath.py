"""I/O section: the stages' read path and commit against a plain tarfile + PIL loop.

(Named ``iopath`` rather than ``io`` so that running a file of this folder as a script
never shadows the standard library's ``io``.)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import WORK, Ctx
from bench.harness import Target, timed

log = logging.getLogger("bench")

IO_VS_PLAIN = Target(">=", 0.8)


def vecap_path(images: Path, shards: list[str], out_root: Path, cfg: Any, image_size: int) -> int:
    """The pipeline's CPU path for a shard, model left out: the caption stage's read step (read +
    decode + resize) and the commit of the shard's rows (captions/ layout, marker last)."""
    import pyarrow as pa

    from vecap.layout import Layout
    from vecap.outputs import StageOutput
    from vecap.stages.base import work_schema
    from vecap.stages.caption import CaptionStage, ImageReadOptions, read_image_rows
    from vecap.storage import Storage

    c = cfg.caption
    stage = CaptionStage(c, cfg.seed)
    opts = ImageReadOptions(image_size, c.max_image_pixels, c.max_image_bytes, cfg.seed)
    storage = Storage.for_path(str(out_root))
    out = StageOutput(Layout(str(out_root)), "caption", storage)
    n = 0
    for shard in shards:
        work = pa.concat_tables(list(read_image_rows(storage, str(images), shard, opts, work_schema([stage]))))
        table = stage.output_table(work)
        n += table.num_rows
        out.commit(shard, table, stage.stats(table) | {"shard": shard})
    return n


def plain_loop(images: Path, shards: list[str], resize_to: int | None = None) -> int:
    """tarfile + PIL decode to RGB (+ a plain resize of the short side to ``resize_to``)."""
    import io
    import tarfile

    from PIL import Image

    exts = {"jpg", "jpeg", "png", "webp"}
    n = 0
    for shard in shards:
        with tarfile.open(images / f"{shard}.tar") as tar:
            for member in tar:
                image = member.name.rsplit(".", 1)[-1].lower() in exts
                f = tar.extractfile(member) if member.isfile() and image else None
                if f is not None:
                    data = f.read()
                    with contextlib.suppress(Exception):  # the sample's one non-image page
                        im = Image.open(io.BytesIO(data)).convert("RGB")
                        if resize_to and min(im.size) > resize_to:
                            scale = resize_to / min(im.size)
                            im = im.resize(
                                (round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC
                            )
                    n += 1
    return n


def bench_io(ctx: Ctx) -> dict[str, Any]:
    s, h = ctx.sizes, ctx.harness
    shards = ctx.shards[: s.io_shards]
    cfg = ctx.cfg(WORK / "runs" / "io")
    out_root = WORK / "runs" / "io"

    def vecap() -> tuple[float, int]:
        shutil.rmtree(out_root, ignore_errors=True)
        result = timed(lambda: vecap_path(ctx.images, shards, out_root, cfg, s.io_image_size))
        shutil.rmtree(out_root, ignore_errors=True)
        return result

    plain_loop(ctx.images, shards)  # page cache warm for every side
    sides = {
        "vecap": vecap,
        "plain": lambda: timed(partial(plain_loop, ctx.images, shards)),
        "plain_resize": lambda: timed(partial(plain_loop, ctx.images, shards, s.io_image_size)),
    }
    reps = h.compare("io", sides, n=max(3, s.reps))
    samples = reps["plain"][0][1]  # image members of the tars; the vecap side also has rows for failed downloads
    per_s = {k: samples / statistics.median(t for t, _ in v) for k, v in reps.items()}
    log.info("io: %s samples/s over %d samples", {k: round(v, 1) for k, v in per_s.items()}, samples)
    h.add(
        "io",
        "I/O: vecap path / plain loop",
        f"samples/s: read + decode + resize to {s.io_image_size} + Parquet commit / "
        f"tarfile + PIL decode ({samples} samples, {len(shards)} shards)",
        per_s["vecap"],
        per_s["plain"],
        IO_VS_PLAIN,
    )
    h.add(
        "io",
        "I/O: vecap path / plain loop + resize",
        f"samples/s: as above / tarfile + PIL decode + resize to {s.io_image_size}",
        per_s["vecap"],
        per_s["plain_resize"],
    )
    return {
        "samples": samples,
        "vecap_rows": reps["vecap"][0][1],
        "shards": len(shards),
        "image_size": s.io_image_size,
        **{f"{k}_per_s": v for k, v in per_s.items()},
        "seconds": {k: [t for t, _ in v] for k, v in reps.items()},
    }
