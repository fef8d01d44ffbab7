"""Stage 2, fuse: an LLM merges alt-text and VLM caption into the VeC caption.

CPU side, before the actor: clean the alt-text, settle the cases that need no LLM
(no alt-text, no VLM caption), render the chat messages. Actor side: generate. CPU
side, after: validate the output and fall back (VLM caption, then alt-text) with
the reason recorded (:mod:`vecap.fusion`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import pyarrow as pa

from vecap import fusion, schemas, vocab
from vecap.backends import Generation, Request
from vecap.config import FuseChecks, FuseConfig, stable_hash
from vecap.faults import FaultPolicy
from vecap.layout import Layout
from vecap.prompting import Prompt, load_prompt
from vecap.reader import read_alt_texts
from vecap.stages.base import (
    EngineWorker,
    Provenance,
    Stage,
    Step,
    engine_spec,
    params_hash,
    seed_for,
    select_output,
    with_json_fields,
    work_table,
)
from vecap.stages.caption import COLUMNS as CAPTION_COLUMNS
from vecap.storage import Storage
from vecap.validation import check_fused
from vecap.validation import fingerprint as checks_fingerprint

STAGE = vocab.FUSE

# What the read of a captions shard takes of a committed caption and its alt-text (caption stage columns).
FROM_CAPTIONS = ("alt_text", "url", "vlm_caption", "caption_seed", "caption_source")
# The work columns of the fuse stage (beyond vecap.stages.base.ROW): those, then the LLM's request,
# answer and verdict.
COLUMNS = pa.schema(
    [
        *(CAPTION_COLUMNS.field(name) for name in FROM_CAPTIONS),
        ("needs_fuse", pa.bool_()),
        ("fuse_messages", pa.string()),  # JSON chat messages, built on CPU before the actor
        ("fuse_output", pa.string()),
        ("fuse_finish_reason", pa.string()),
        ("fuse_n_prompt_tokens", pa.int32()),
        ("fuse_n_output_tokens", pa.int32()),
        ("fuse_seed", pa.int64()),
        ("vec_caption", pa.string()),
        ("vec_source", pa.string()),
        ("fuse_reason", pa.string()),  # why the VeC caption is not the LLM's (vecap.vocab)
        ("fuse_error", pa.string()),  # its detail
        ("fused_status", pa.string()),  # the fused row's status (image failure, ok or no_text)
        ("fuse_quality", pa.string()),  # JSON: vecap.validation's quality columns of the fused caption
    ]
)


def read_caption_rows(
    storage: Storage, layout: Layout, shard: str, schema: pa.Schema, only_keys: set[str] | None = None
) -> Iterator[pa.Table]:
    """One shard's committed captions, joined with its alt-texts → work rows (of the run's work
    ``schema``), then its marker row."""
    alts = read_alt_texts(layout.images, shard, storage)
    rows = []
    for c in storage.read_table(layout.parquet("caption", shard)).to_pylist():
        if only_keys is not None and c["key"] not in only_keys:
            continue
        alt = alts.get(c["key"], {})
        rows.append(
            {
                "key": c["key"],
                "shard": shard,
                "source": vocab.FROM_CAPTIONS,
                "is_marker": False,
                "status": c["status"],
                "error": c["error"],
                "alt_text": alt.get("alt_text"),
                "url": alt.get("url"),
                "vlm_caption": c["vlm_caption"],
                "caption_seed": c["seed"],
                "caption_source": c["caption_source"],
            }
        )
    rows.append({"shard": shard, "is_marker": True, "report": json.dumps({"n_rows": len(rows)})})
    yield work_table(rows, schema)


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
        if r["is_marker"]:
            continue
        if r["status"] in vocab.IMAGE_FAILURES:
            r["fused_status"] = r["status"]
            continue
        if r.get("caption_source") == vocab.DUPLICATE and r["source"] == vocab.FROM_IMAGES:
            continue  # its caption comes when its first copy's shard commits: fused in a second pass
        r["fuse_seed"] = seed_for(run_seed, STAGE, r["key"])
        alt = fusion.clean_alt_text(r.get("alt_text"), max_alt_text_words)
        if r["status"] in vocab.RETRYABLE:  # the caption engine failed: an infrastructure fallback
            _set_result(r, fusion.fall_back(alt, "", vocab.CAPTION_FAILED), detail=r["status"])
            continue
        vlm = (r.get("vlm_caption") or "").strip() if r["status"] == vocab.OK else ""
        settled = fusion.pre_decision(alt, vlm)
        if settled is not None:
            _set_result(r, settled)
            continue
        r["fuse_messages"] = json.dumps(prompt.messages(alt_text=alt, vlm_caption=vlm), ensure_ascii=False)
        r["needs_fuse"] = True
    return work_table(rows, batch.schema)


class FuseWorker(EngineWorker):
    """Holds the text LLM; generates for the rows that need fusing."""

    flag = "needs_fuse"
    stage = STAGE

    def request(self, row: dict[str, Any]) -> Request:
        return Request(messages=json.loads(row["fuse_messages"]), seed=row["fuse_seed"], key=row["key"])

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        row.update(
            fuse_output=gen.text,
            fuse_finish_reason=gen.finish_reason,
            fuse_n_prompt_tokens=gen.n_prompt_tokens,
            fuse_n_output_tokens=gen.n_output_tokens,
            fuse_error=gen.error,
            fuse_reason=(gen.reason or vocab.MODEL_ERROR) if gen.error is not None else None,
            fuse_messages=None,
        )


def validate_fused(batch: pa.Table, instructions: str, max_alt_text_words: int, checks: FuseChecks) -> pa.Table:
    """Ray Data UDF (CPU): accept the LLM's caption (tidied) or fall back, recording the reason."""
    rows = batch.to_pylist()
    for r in rows:
        if r["is_marker"] or r.get("fuse_seed") is None or r.get("vec_source") is not None or r.get("fused_status"):
            continue
        alt = fusion.clean_alt_text(r.get("alt_text"), max_alt_text_words)
        vlm = (r.get("vlm_caption") or "").strip()
        if r.get("fuse_reason"):  # the engine failed on this row
            _set_result(r, fusion.fall_back(alt, vlm, r["fuse_reason"]), detail=r.get("fuse_error"))
            continue
        verdict = check_fused(r.get("fuse_output"), r.get("fuse_finish_reason"), alt, vlm, instructions, checks)
        r["fuse_quality"] = json.dumps(verdict.quality)
        if verdict.reason is None:
            _set_result(r, fusion.Fused(verdict.text, "fused", None))
        else:
            _set_result(r, fusion.fall_back(alt, vlm, verdict.reason), detail=verdict.detail)
    return work_table(rows, batch.schema)


def _set_result(row: dict[str, Any], fused: fusion.Fused, detail: str | None = None) -> None:
    """Record the VeC caption; the sample is usable when it has one (even if its caption failed)."""
    row["vec_caption"], row["vec_source"] = fused.vec_caption, fused.vec_source
    row["fuse_reason"], row["fuse_error"] = fused.reason, detail
    row["fused_status"] = vocab.NO_TEXT if fused.vec_caption is None else vocab.OK


class FuseStage(Stage):
    """The fuse stage of a recipe: prompt building, the LLM actors, validation, ``fused/``."""

    name: ClassVar[str] = STAGE
    schema: ClassVar[pa.Schema] = schemas.FUSED
    columns: ClassVar[pa.Schema] = COLUMNS
    read_columns: ClassVar[tuple[str, ...]] = ("status", "error", *FROM_CAPTIONS)
    reads: ClassVar[tuple[str, ...]] = (
        "fused_status",
        "error",
        "fuse_reason",
        "fuse_error",
        "alt_text",
        "vlm_caption",
        "vec_caption",
        "vec_source",
        "fuse_finish_reason",
        "fuse_n_prompt_tokens",
        "fuse_n_output_tokens",
        "fuse_seed",
        "fuse_quality",
    )

    def __init__(self, cfg: FuseConfig, run_seed: int, faults: FaultPolicy | None = None) -> None:
        self.cfg = cfg
        self.faults = faults or FaultPolicy.of(cfg)
        self.run_seed = run_seed
        self.spec = engine_spec(cfg, multimodal=False)
        self.prompt = load_prompt(STAGE, cfg.prompt)
        self.provenance = Provenance(self.spec.model, self.prompt.id, self.prompt.sha256, params_hash(self.spec))

    def fingerprint(self) -> dict[str, Any]:
        # Everything that changes the rows must match: the model provenance, the prompt's inputs,
        # the validation thresholds, and the per-sample seeds when decoding samples.
        return {
            **self.provenance.columns(),
            # the recipe's thresholds, and the checks and text libraries (with versions) that apply them
            "checks_sha256": stable_hash(
                {**self.cfg.validation.model_dump(mode="json"), "validator": checks_fingerprint()}
            ),
            "max_alt_text_words": self.cfg.max_alt_text_words,
            "seed": self.run_seed if self.cfg.temperature > 0 else None,
        }

    def steps(self) -> list[Step]:
        f = self.cfg
        return [
            Step(
                "fuse-prepare",
                prepare_fuse_requests,
                {"prompt": self.prompt, "max_alt_text_words": f.max_alt_text_words, "run_seed": self.run_seed},
                inputs=("status", "alt_text", "vlm_caption", "caption_source"),
                outputs=(
                    "fused_status",
                    "fuse_seed",
                    "fuse_messages",
                    "needs_fuse",
                    "vec_caption",
                    "vec_source",
                    "fuse_reason",
                    "fuse_error",
                ),
                num_cpus=0.25,
            ),
            Step(
                "fuse",
                FuseWorker,
                {"spec": self.spec, "faults": self.faults},
                inputs=("needs_fuse", "fuse_messages", "fuse_seed"),
                outputs=(
                    "fuse_messages",
                    "fuse_output",
                    "fuse_finish_reason",
                    "fuse_n_prompt_tokens",
                    "fuse_n_output_tokens",
                    "fuse_reason",
                    "fuse_error",
                    "engine_stats",
                ),
                actors=f.actors,
                batch_size=f.batch_size,
                num_cpus=f.cpus_per_actor,
                num_gpus=f.gpus_per_actor,
                batches_in_flight=f.max_batches_in_flight,
                env=dict(f.env),
                max_restarts=self.faults.max_restarts,
                max_task_retries=self.faults.max_task_retries,
            ),
            Step(
                "fuse-check",
                validate_fused,
                {
                    "instructions": instructions_of(self.prompt),
                    "max_alt_text_words": f.max_alt_text_words,
                    "checks": f.validation,
                },
                inputs=(
                    "fuse_seed",
                    "vec_source",
                    "fused_status",
                    "alt_text",
                    "vlm_caption",
                    "fuse_output",
                    "fuse_finish_reason",
                    "fuse_reason",
                    "fuse_error",
                ),
                outputs=("vec_caption", "vec_source", "fuse_reason", "fuse_error", "fused_status", "fuse_quality"),
                num_cpus=0.25,
            ),
        ]

    def output_table(self, work: pa.Table) -> pa.Table:
        # An image failure keeps its own status as reason and its error; otherwise they are the fallback's.
        columns = ("fused_status", "error", "fuse_reason", "fuse_error")
        image_failed = [s in vocab.IMAGE_FAILURES for s in work["fused_status"].to_pylist()]
        reasons, errors = [], []
        for failed, s, e, fr, fe in zip(image_failed, *(work[c].to_pylist() for c in columns), strict=True):
            reasons.append(s if failed else fr)
            errors.append(e if failed else fe)
        work = work.append_column("fused_reason", pa.array(reasons, pa.string()))
        work = work.append_column("fused_error", pa.array(errors, pa.string()))
        work = with_json_fields(work, "fuse_quality", schemas.QUALITY_FUSE)
        return select_output(
            work,
            self.schema,
            {
                "key": "key",
                "shard": "shard",
                "status": "fused_status",
                "reason": "fused_reason",
                "error": "fused_error",
                "alt_text": "alt_text",
                "vlm_caption": "vlm_caption",
                "vec_caption": "vec_caption",
                "vec_source": "vec_source",
                "finish_reason": "fuse_finish_reason",
                "n_prompt_tokens": "fuse_n_prompt_tokens",
                "n_output_tokens": "fuse_n_output_tokens",
                "seed": "fuse_seed",
                **{name: name for name, _ in schemas.QUALITY_FUSE},
            },
            self.provenance.columns(),
        )

    def stats(self, table: pa.Table) -> dict[str, Any]:
        out = super().stats(table)
        out["fallbacks"] = fallback_counts(table)
        # Fallbacks caused by the infrastructure, not by the model's output: never silent.
        out["infra_fallbacks"] = {k: v for k, v in out["fallbacks"].items() if k in vocab.INFRA_REASONS}
        out["vec_sources"] = dict(Counter(s for s in table["vec_source"].to_pylist() if s))
        return out


def fallback_counts(table: pa.Table) -> dict[str, int]:
    """Per-reason counts of fused rows whose VeC caption is not the LLM's (the shard stats' fallbacks)."""
    counts: Counter = Counter()
    for source, status, reason in zip(*(table[c].to_pylist() for c in ("vec_source", "status", "reason")), strict=True):
        if source in vocab.FALLBACK_SOURCES or status == vocab.NO_TEXT:
            counts[reason or "unknown"] += 1
    return dict(counts)
