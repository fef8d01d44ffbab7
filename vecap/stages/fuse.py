"""Stage 2, fuse: an LLM merges alt-text and VLM caption into the VeC caption.

CPU side, before the actor: clean the alt-text, settle the cases that need no LLM
(no alt-text, no VLM caption), render the chat messages. Actor side: generate. CPU
side, after: validate the output and fall back (VLM caption, then alt-text) with
the reason recorded (:mod:`vecap.fusion`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from vecap import fusion, schemas
from vecap.backends import Generation, Request
from vecap.prompts import Prompt
from vecap.reader import read_alt_texts
from vecap.stages.common import EngineWorker, Provenance, seed_for, work_table
from vecap.writer import StageDir

STAGE = "fuse"


def read_caption_rows(
    shard: str, images_dir: str, captions_dir: str, only_keys: set[str] | None = None
) -> Iterator[pa.Table]:
    """One shard's committed captions, joined with its alt-texts → work rows, then its marker row."""
    alts = read_alt_texts(images_dir, shard)
    rows = []
    for c in StageDir(captions_dir).read_table(shard).to_pylist():
        if only_keys is not None and c["key"] not in only_keys:
            continue
        alt = alts.get(c["key"], {})
        rows.append(
            {
                "key": c["key"],
                "shard": shard,
                "is_marker": False,
                "status": c["status"],
                "error": c["error"],
                "alt_text": alt.get("alt_text"),
                "url": alt.get("url"),
                "vlm_caption": c["vlm_caption"],
                "caption_seed": c["seed"],
            }
        )
    rows.append({"shard": shard, "is_marker": True, "report": json.dumps({"n_rows": len(rows)})})
    yield work_table(rows)


def instructions_of(prompt: Prompt) -> str:
    """The prompt's fixed wording, for echo detection (placeholders removed)."""
    text = (prompt.system or "") + "\n" + prompt.template
    for name in prompt.placeholders:
        text = text.replace("{" + name + "}", " ")
    return text


def prepare_fuse_requests(batch: pa.Table, prompt: Prompt, max_alt_text_words: int, run_seed: int) -> pa.Table:
    """Ray Data UDF (CPU): decide which rows need the LLM and render their messages."""
    rows = batch.to_pylist()
    for r in rows:
        if r["is_marker"] or r["status"] in schemas.IMAGE_FAILURES:
            continue
        r["fuse_seed"] = seed_for(run_seed, STAGE, r["key"])
        alt = fusion.clean_alt_text(r.get("alt_text"), max_alt_text_words)
        vlm = (r.get("vlm_caption") or "").strip()
        settled = fusion.pre_decision(alt, vlm)
        if settled is not None:
            _set_result(r, settled)
            continue
        r["fuse_messages"] = json.dumps(prompt.messages(alt_text=alt, vlm_caption=vlm), ensure_ascii=False)
        r["needs_fuse"] = True
    return work_table(rows)


class FuseWorker(EngineWorker):
    """Holds the text LLM; generates for the rows that need fusing."""

    flag = "needs_fuse"

    def request(self, row: dict[str, Any]) -> Request:
        return Request(messages=json.loads(row["fuse_messages"]), seed=row["fuse_seed"])

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        row.update(
            fuse_output=gen.text,
            fuse_finish_reason=gen.finish_reason,
            fuse_n_prompt_tokens=gen.n_prompt_tokens,
            fuse_n_output_tokens=gen.n_output_tokens,
            fuse_error=gen.error,
            fuse_messages=None,
        )


def validate_fused(
    batch: pa.Table, prompt: Prompt, max_alt_text_words: int, max_caption_words: int, require_entities: bool
) -> pa.Table:
    """Ray Data UDF (CPU): accept the LLM's caption or fall back, recording the reason."""
    instructions = instructions_of(prompt)
    rows = batch.to_pylist()
    for r in rows:
        if r["is_marker"] or r.get("fuse_seed") is None or r.get("vec_source") is not None:
            continue
        alt = fusion.clean_alt_text(r.get("alt_text"), max_alt_text_words)
        vlm = (r.get("vlm_caption") or "").strip()
        if r.get("fuse_error"):
            _set_result(r, fusion.fall_back(alt, vlm, "model_error"), detail=r["fuse_error"])
            continue
        output = fusion.tidy_output(r.get("fuse_output"))
        reason = fusion.rejection_reason(
            output,
            finish_reason=r.get("fuse_finish_reason"),
            alt_text=alt,
            vlm_caption=vlm,
            instructions=instructions,
            max_words=max_caption_words,
            require_entities=require_entities,
        )
        _set_result(r, fusion.Fused(output, "fused", None) if reason is None else fusion.fall_back(alt, vlm, reason))
    return work_table(rows)


def _set_result(row: dict[str, Any], fused: fusion.Fused, detail: str | None = None) -> None:
    row["vec_caption"], row["vec_source"] = fused.vec_caption, fused.vec_source
    row["fuse_error"] = fused.reason if detail is None else f"{fused.reason}: {detail}"
    if fused.vec_caption is None:
        row["status"] = schemas.NO_TEXT
    elif row["status"] == schemas.MODEL_ERROR:
        row["status"] = schemas.OK  # the caption failed, but the sample has a usable caption


def fused_rows(rows: list[dict[str, Any]], prov: Provenance) -> list[dict[str, Any]]:
    """Work rows of one shard → rows of ``fused/NNNNN.parquet``."""
    out = []
    for r in rows:
        image_failed = r["status"] in schemas.IMAGE_FAILURES
        out.append(
            {
                "key": r["key"],
                "shard": r["shard"],
                "status": r["status"],
                "error": r["error"] if image_failed else r.get("fuse_error"),
                "alt_text": r.get("alt_text"),
                "vlm_caption": r.get("vlm_caption"),
                "vec_caption": r.get("vec_caption"),
                "vec_source": r.get("vec_source"),
                "finish_reason": r.get("fuse_finish_reason"),
                "n_prompt_tokens": r.get("fuse_n_prompt_tokens"),
                "n_output_tokens": r.get("fuse_n_output_tokens"),
                **prov.columns(),
                "seed": r.get("fuse_seed"),
            }
        )
    return out


def fallback_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Per-reason counts of fused rows whose VeC caption is not the LLM's (the shard stats' fallbacks)."""
    counts: dict[str, int] = {}
    for r in rows:
        if r["vec_source"] in ("vlm", "alt") or r["status"] == schemas.NO_TEXT:
            reason = (r["error"] or "unknown").split(":", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
    return counts
