"""What the engine benchmarks feed the engines: the stages' own requests, built from the same
shards by the stages' own CPU steps, and committed synthetic captions for the fuse stage to read.

Shared by :mod:`bench.engines` and :mod:`bench.profile` (which imports nothing of the former).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any


@cache
def work_rows_schema() -> Any:
    """The work rows of a run of the caption and fuse stages (the demo recipe's), as the stream carries them."""
    from vecap.config import load_config
    from vecap.stages.base import work_schema
    from vecap.stages.caption import CaptionStage
    from vecap.stages.fuse import FuseStage

    cfg = load_config("demo")
    return work_schema([CaptionStage(cfg.caption, cfg.seed), FuseStage(cfg.fuse, cfg.seed)])


def vllm_reset(engine: Any) -> None:
    """Empty a vLLM engine's prefix, multimodal-input and encoder caches: the next call starts cold,
    as in a new run (the encoder cache would otherwise give a repeated image's vision-tower output
    for free). Called while the engine is idle."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return
    llm.reset_prefix_cache()
    if hasattr(llm, "reset_mm_cache"):
        llm.reset_mm_cache()
    if hasattr(llm.llm_engine, "reset_encoder_cache"):
        llm.llm_engine.reset_encoder_cache()


def caption_rows(cfg: Any, images: Path, shards: list[str]) -> list[dict[str, Any]]:
    """The rows the caption actor gets, read by the stage's own reader (pixels, seeds); captioned rows only."""
    from vecap.stages.base import work_schema
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.storage import Storage

    stage = CaptionStage(cfg.caption, cfg.seed)
    storage = Storage.for_path(str(images))
    return [
        r
        for shard in shards
        for table in read_image_rows(storage, str(images), shard, stage.read_options, work_schema([stage]))
        for r in table.to_pylist()
        if r.get("needs_caption")
    ]


def caption_requests(cfg: Any, images: Path, shards: list[str]) -> tuple[list, list[str]]:
    """The caption actor's requests, built as the stage builds them (same keys, seeds, messages, pixels)."""
    from PIL import Image

    from vecap.backends import Request
    from vecap.stages.caption import CaptionStage

    messages = CaptionStage(cfg.caption, cfg.seed).prompt.messages(image=True)
    rows = caption_rows(cfg, images, shards)
    requests = [
        Request(
            messages=messages,
            seed=r["caption_seed"],
            image=Image.frombytes("RGB", (r["pixels_w"], r["pixels_h"]), r["pixels"]),
        )
        for r in rows
    ]
    return requests, [r["key"] for r in rows]


def write_captions(root: Path, shards: list[str], cfg: Any) -> None:
    """Committed captions as the fuse stage's input, through the library's commit path.

    In-domain sentences for the bench tokenizer: the random bench VLM's captions are byte
    soup, often empty, which the fuse stage settles without the LLM; real captions are one sentence.
    """
    from vecap import schemas, vocab
    from vecap.demo.tiny_models import training_sentences
    from vecap.layout import Layout
    from vecap.outputs import StageOutput
    from vecap.stages.base import seed_for, work_schema
    from vecap.stages.caption import CaptionStage, read_image_rows
    from vecap.storage import Storage

    sentences = training_sentences(2000)
    stage = CaptionStage(cfg.caption, cfg.seed)
    storage = Storage.for_path(str(root))
    layout = Layout(str(root))
    out = StageOutput(layout, "caption", storage)
    i = 0
    for shard in shards:
        rows = []
        for table in read_image_rows(storage, layout.images, shard, stage.read_options, work_schema([stage])):
            for r in table.to_pylist():
                if r["is_marker"]:
                    continue
                row = {
                    "key": r["key"],
                    "shard": shard,
                    "status": r["status"],
                    "reason": vocab.caption_reason(r["status"]),
                    "error": r["error"],
                    "seed": seed_for(cfg.seed, "caption", r["key"]),
                    "model": "bench-synthetic",
                    "prompt_id": "bench",
                    "prompt_sha256": "0" * 64,
                    "params_sha256": "0" * 64,
                }
                if r.get("needs_caption"):
                    row.update(vlm_caption=sentences[i % len(sentences)], finish_reason="stop")
                    i += 1
                rows.append(row)
        table = schemas.table(sorted(rows, key=lambda r: r["key"]), schemas.CAPTIONS)
        out.commit(shard, table, {"stage": "caption", "shard": shard, "n_rows": len(rows), "fingerprint": None})


def fuse_rows(cfg: Any, root: Path, shards: list[str]) -> list[dict[str, Any]]:
    """The rows the fuse actor gets, made by the stage's own CPU steps (messages, seeds); rows that need the LLM."""
    from vecap.layout import Layout
    from vecap.stages.base import work_schema
    from vecap.stages.fuse import FuseStage, prepare_fuse_requests, read_caption_rows
    from vecap.storage import Storage

    f = cfg.fuse
    stage = FuseStage(f, cfg.seed)
    storage = Storage.for_path(str(root))
    rows = []
    for shard in shards:
        for table in read_caption_rows(storage, Layout(str(root)), shard, work_schema([stage])):
            table = prepare_fuse_requests(table, stage.prompt, f.max_alt_text_words, cfg.seed)
            rows += [r for r in table.to_pylist() if r.get("needs_fuse")]
    return rows


def fuse_requests(cfg: Any, root: Path, shards: list[str]) -> list:
    """The fuse actor's requests, built with the stage's own CPU steps (same messages and seeds)."""
    from vecap.backends import Request

    return [Request(messages=json.loads(r["fuse_messages"]), seed=r["fuse_seed"]) for r in fuse_rows(cfg, root, shards)]
