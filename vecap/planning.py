"""What a run does with each input shard, from the root's files: the stale shards refused or
invalidated, the stages each shard still needs, the keys ``--retry-failed`` redoes, and the
input shards of a usable root."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vecap import vocab
from vecap.config import ConfigError, PipelineConfig
from vecap.layout import STAGES, Layout
from vecap.outputs import StageOutput
from vecap.ray_env import ray_address
from vecap.reader import list_shards
from vecap.stages.base import Stage
from vecap.storage import Storage, is_uri
from vecap.summary import StageTally

log = logging.getLogger(__name__)


class ConfigMismatch(RuntimeError):
    """Committed shards were made with another model, prompt or parameters."""


def invalidate_stale(
    stages: dict[str, Stage], layout: Layout, storage: Storage, selected: set[str] | None, overwrite: bool
) -> None:
    """Refuse to add shards made differently to a stage's committed ones, unless overwriting.

    With ``overwrite`` the mismatching shards among ``selected`` (all when None), and what
    was built from them downstream, are invalidated and recomputed; no other shard is touched.
    """
    for step, stage in stages.items():
        fp = stage.fingerprint()
        prints = {s: m.get("fingerprint") for s, m in StageOutput(layout, step, storage).markers().items()}
        stale = [s for s, p in prints.items() if p not in (None, fp)]
        if not stale:
            continue
        if not overwrite:
            # Any committed shard made differently refuses the run, selected or not: adding a
            # shard with other settings would mix them in one stage folder.
            old = prints[stale[0]] or {}
            diff = {k: (old.get(k), fp.get(k)) for k in sorted(set(fp) | set(old)) if old.get(k) != fp.get(k)}
            raise ConfigMismatch(
                f"{len(stale)} committed shard(s) in {layout.stage(step)} were made with other settings "
                f"(committed → now: {diff}). Use a new root, or pass --overwrite to recompute them "
                "(with --shards, only those)."
            )
        chosen = [s for s in stale if selected is None or s in selected]
        log.warning("overwriting %d shard(s) of %s made with other settings", len(chosen), layout.stage(step))
        for shard in chosen:
            for later in STAGES[STAGES.index(step) :]:
                StageOutput(layout, later, storage).invalidate(shard)


@dataclass
class ShardPlan:
    """What this run does with one shard."""

    shard: str
    source: str | None  # vocab.FROM_IMAGES | vocab.FROM_CAPTIONS | None (write only)
    stream: list[str]  # stages computed in the stream
    write: bool
    retry_keys: set[str] | None = None
    # Duplicate images (vecap.reuse): stages whose commit waits for a second pass (the first pass
    # leaves their parts), and the second pass itself, which fuses the shard's duplicates alone.
    deferred: tuple[str, ...] = ()
    duplicates_only: bool = False
    n_rows: int | None = None  # rows streamed when known in advance (the progress bar)

    @property
    def commits(self) -> list[str]:
        return [s for s in self.stream if s not in self.deferred]


def failed_keys(table: Any) -> set[str]:
    """Keys whose model call failed in a committed shard (its reason ``model_error`` or
    ``engine_crash``): what ``--retry-failed`` redoes."""
    rows = table.select(["key", "reason"]).to_pylist()
    return {r["key"] for r in rows if r["reason"] in vocab.RETRYABLE}


def plan(
    stages: dict[str, Stage], layout: Layout, storage: Storage, input_shards: Sequence[str], retry_failed: bool
) -> tuple[list[ShardPlan], dict[str, StageTally]]:
    steps = list(stages)
    done = {s: StageOutput(layout, s, storage).done() for s in STAGES}
    tallies = {s: StageTally() for s in steps}
    if retry_failed and steps not in ([vocab.CAPTION], [vocab.FUSE]):
        raise ConfigError("--retry-failed works on one model stage at a time: caption or fuse")
    plans = []
    for shard in input_shards:
        need = {s: s in steps and shard not in done[s] for s in STAGES}
        retry = None
        if retry_failed and shard in done[steps[0]]:
            retry = failed_keys(StageOutput(layout, steps[0], storage).read_table(shard)) or None
            need[steps[0]] = retry is not None
        for s in steps:
            tallies[s].skipped_shards += 0 if need[s] else 1
        stream, source = _stream_of(shard, steps, need, done)
        if stream or need[vocab.WRITE]:
            plans.append(ShardPlan(shard, source, stream, need[vocab.WRITE], retry))
    return plans, tallies


def _stream_of(
    shard: str, steps: list[str], need: dict[str, bool], done: dict[str, set[str]]
) -> tuple[list[str], str | None]:
    """The stages a shard streams through (from the first that has work to every requested one after
    it, in vocab.STREAM_STAGES order) and where the stream reads it; an error when what the first of them
    or the write stage takes is not committed yet."""
    in_order = [s for s in vocab.STREAM_STAGES if s in steps]
    first = next((s for s in in_order if need[s]), None)
    stream = in_order[in_order.index(first) :] if first is not None else []
    for stage in [*stream[:1], *([vocab.WRITE] if need[vocab.WRITE] else [])]:
        i = vocab.STAGES.index(stage)
        before = vocab.STAGES[i - 1] if i else None  # the stage whose output this one takes
        if before is not None and before not in stream and shard not in done[before]:
            raise ConfigError(f"shard {shard} has no {before} output yet: run `vecap {before}` (or `vecap run`) first")
    return stream, vocab.READS_FROM[first] if first is not None else None


def check_root(cfg: PipelineConfig, layout: Layout, storage: Storage) -> list[str]:
    """The input shards of the root; a clear error for an unusable root (or Ray address)."""
    address = ray_address(cfg) or ""
    if address.startswith("ray://"):
        raise ConfigError(
            f"Ray address {address!r} is a Ray Client address, and Ray Data does not run over Ray Client "
            "(ray-project/ray#48682). Submit the run as a Ray job (ray job submit --address http://HEAD:8265 -- "
            "vecap run ...), or run vecap on a node of the cluster with RAY_ADDRESS=HEAD:6379 (the GCS address)."
        )
    for name, path in (("root", cfg.root), ("caption.cache", cfg.caption.cache)):
        if path and ray_address(cfg) and not is_uri(path) and not os.path.isabs(path):
            raise ConfigError(
                f"{name} {path!r} is relative, but the run connects to a Ray cluster ({ray_address(cfg)}): "
                "each node would resolve it in its own working directory. Give an absolute path on a shared "
                "file system or an object-store URI (s3://..., gs://...)."
            )
    shards = list_shards(layout.images, storage=storage)
    if not shards:
        raise ConfigError(
            f"no input shards (NNNNN.tar) found in {layout.images}: check `root` (is it the folder holding images/?)"
        )
    return shards


def select_shards(input_shards: list[str], shards: Sequence[str] | None, layout: Layout) -> list[str]:
    """The input shards ``--shards`` selects (all when None); an unknown name is an error."""
    if shards is None:
        return input_shards
    unknown = sorted(set(shards) - set(input_shards))
    if unknown:
        raise ConfigError(f"--shards names shards that are not in {layout.images}: {unknown}")
    return [s for s in input_shards if s in set(shards)]
