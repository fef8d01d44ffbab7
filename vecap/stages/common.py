"""What the model stages share: the in-flight row schema, seeds, provenance, engine actors.

Rows flow through Ray Data as Arrow tables with :data:`WORK` as schema. Each shard
ends with one *marker* row (``is_marker``) carrying the shard's row count and read
report; the driver commits a shard once its marker and all its rows have arrived.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from vecap.backends import EngineSpec, Generation, Request, Sampling, load_engine
from vecap.config import ModelConfig, stable_hash

log = logging.getLogger(__name__)

WORK = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("is_marker", pa.bool_()),
        ("report", pa.string()),  # marker rows: JSON of the shard's read report and row count
        ("status", pa.string()),
        ("error", pa.string()),
        ("alt_text", pa.string()),
        ("url", pa.string()),
        ("pixels", pa.binary()),
        ("pixels_w", pa.int32()),
        ("pixels_h", pa.int32()),
        ("needs_caption", pa.bool_()),
        ("vlm_caption", pa.string()),
        ("caption_finish_reason", pa.string()),
        ("caption_n_prompt_tokens", pa.int32()),
        ("caption_n_output_tokens", pa.int32()),
        ("caption_seed", pa.int64()),
        ("needs_fuse", pa.bool_()),
        ("fuse_messages", pa.string()),  # JSON chat messages, built on CPU before the actor
        ("fuse_instructions", pa.string()),
        ("fuse_output", pa.string()),
        ("fuse_finish_reason", pa.string()),
        ("fuse_n_prompt_tokens", pa.int32()),
        ("fuse_n_output_tokens", pa.int32()),
        ("fuse_seed", pa.int64()),
        ("vec_caption", pa.string()),
        ("vec_source", pa.string()),
        ("fuse_error", pa.string()),
    ]
)


def work_table(rows: list[dict[str, Any]]) -> pa.Table:
    names = WORK.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=WORK)


def seed_for(run_seed: int, stage: str, key: str) -> int:
    """A per-sample seed from the key: reruns and any batching give the same samples."""
    digest = hashlib.sha256(f"{run_seed}:{stage}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Provenance:
    """Columns that say which model, prompt and parameters produced a row."""

    model: str
    prompt_id: str
    prompt_sha256: str
    params_sha256: str

    def columns(self) -> dict[str, str]:
        return {
            "model": self.model,
            "prompt_id": self.prompt_id,
            "prompt_sha256": self.prompt_sha256,
            "params_sha256": self.params_sha256,
        }


def engine_spec(cfg: ModelConfig, multimodal: bool) -> EngineSpec:
    """The section of the recipe that concerns the engine, as the engine's own typed spec."""
    return EngineSpec(
        backend=cfg.backend,
        model=cfg.model,
        multimodal=multimodal,
        sampling=Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p),
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        engine_kwargs=dict(cfg.engine),
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        request_concurrency=cfg.request_concurrency,
        request_timeout_s=cfg.request_timeout_s,
    )


def params_hash(spec: EngineSpec) -> str:
    """What changes outputs for the same model and prompt: backend, dtype, decoding, engine options."""
    return stable_hash(
        {"backend": spec.backend, "dtype": spec.dtype, "sampling": spec.sampling.to_dict(), "engine": spec.engine_kwargs}
    )


class EngineWorker:
    """A Ray Data actor UDF that holds one engine for its lifetime.

    Subclasses say which rows need the engine (``flag``), how a row becomes a request,
    and how a generation goes back into the row. Everything else (batching, passing
    other rows through, error isolation) is here, once, for both model stages.
    """

    flag: str = ""

    def __init__(self, spec: EngineSpec) -> None:
        logging.basicConfig(level=logging.INFO)
        self.engine = load_engine(spec)

    def request(self, row: dict[str, Any]) -> Request:
        raise NotImplementedError

    def apply(self, row: dict[str, Any], gen: Generation) -> None:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r.get(self.flag)]
        if todo:
            requests, ready = [], []
            for r in todo:
                try:
                    requests.append(self.request(r))
                    ready.append(r)
                except Exception as err:  # noqa: BLE001 - a bad row is a row status
                    self.apply(r, Generation(text=None, error=f"{type(err).__name__}: {err}"))
            for r, gen in zip(ready, self.engine.generate(requests)):
                self.apply(r, gen)
            for r in todo:
                r[self.flag] = False
        return work_table(rows)
