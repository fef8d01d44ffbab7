"""Caption each image once: identical images within a run, and a caption cache across runs.

Images are identified by img2dataset's ``sha256`` (of the downloaded bytes, in its Parquet).
Before the stream, one Ray Data job groups the pending shards' keys by sha256 together with
the cache's entries for this caption fingerprint:

- an image found in the cache takes the cached caption (``caption_source`` ``cache``);
- otherwise its first copy (lowest shard, then key) is captioned (``computed``) and every
  other copy is a ``duplicate`` of it, filled in when the shard commits, once the shard
  holding the first copy has committed (the driver orders those commits).

The job writes, per shard that reuses anything, a small Parquet of its reused keys
(``captions/_reuse/<run>/NNNNN.parquet``) and returns per shard its counts and the shards it
waits for; no process ever holds every key. The cache is a folder per caption fingerprint
(model, prompt, parameters, checks, image options: :meth:`CaptionStage.fingerprint`) of
immutable Parquet files, one per committed shard, each written atomically, so a killed run
leaves a readable cache and entries made with other settings are never seen.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vecap import schemas, vocab
from vecap.config import stable_hash
from vecap.storage import Storage

log = logging.getLogger(__name__)

COMPUTED, DUPLICATE, CACHE = vocab.COMPUTED, vocab.DUPLICATE, vocab.CACHE
# Caption outcomes that are the model's answer for these pixels: what copies and the cache reuse.
REUSABLE = frozenset({vocab.OK, vocab.CAPTION_REJECTED})
# The caption fields an image's copies share (the columns of captions/ that describe the VLM's answer).
CAPTION_FIELDS = (
    "status",
    "reason",
    "error",
    "vlm_caption",
    "finish_reason",
    "seed",
    *(n for n, _ in schemas.QUALITY_CAPTION),
)

CACHE_SCHEMA = pa.schema(
    [("sha256", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("entry", pa.string())]
)  # entry: JSON of CAPTION_FIELDS
REUSE_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("caption_source", pa.string()),
        ("caption_from", pa.string()),  # the key whose caption is used
        ("caption_from_shard", pa.string()),
        ("entry", pa.string()),  # cache: the cached caption fields (JSON)
    ]
)
_GROUPED = pa.schema([("role", pa.string()), *CACHE_SCHEMA])


def entry_reason(entry: dict[str, Any]) -> dict[str, Any]:
    """A cache entry's ``reason`` and ``error``; an entry written before the reason column had
    the reason at the head of its error (the one conversion: :func:`vecap.outputs.split_legacy_error`)."""
    if "reason" in entry:
        return {"reason": entry["reason"], "error": entry["error"]}
    from vecap.outputs import split_legacy_error

    reason, error = split_legacy_error(
        entry["status"], entry["error"], rejected=entry["status"] == vocab.CAPTION_REJECTED
    )
    return {"reason": reason, "error": error}


@dataclass(frozen=True)
class CaptionCache:
    """A caption cache location, seen through one caption fingerprint."""

    location: str
    fingerprint: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return f"{self.location.rstrip('/')}/{stable_hash(self.fingerprint)[:16]}"

    def storage(self) -> Storage:
        return Storage.for_path(self.location, self.storage_options)

    def files(self) -> list[str]:
        """The complete entry files (temporaries of a killed writer start with '.')."""
        names = self.storage().names(self.folder)
        return [f"{self.folder}/{n}" for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]

    def add(self, captions: pa.Table, shard: str) -> int:
        """Add a committed shard's computed captions; returns how many. One atomic file per call."""
        rows = [
            r
            for r in captions.to_pylist()
            if r.get("caption_source") in (COMPUTED, None) and r["status"] in REUSABLE and r.get("sha256")
        ]
        if not rows:
            return 0
        storage = self.storage()
        if not storage.exists(f"{self.folder}/_fingerprint.json"):  # for people: what these entries were made with
            storage.write_json(f"{self.folder}/_fingerprint.json", self.fingerprint)
        table = pa.Table.from_pylist(
            [
                {
                    "sha256": r["sha256"],
                    "key": r["key"],
                    "shard": shard,
                    "entry": json.dumps({f: r.get(f) for f in CAPTION_FIELDS}),
                }
                for r in rows
            ],
            schema=CACHE_SCHEMA,
        )
        storage.write_table(f"{self.folder}/{shard}-{uuid.uuid4().hex[:12]}.parquet", table)
        return len(rows)


@dataclass
class ShardReuse:
    n_duplicate: int = 0
    n_cache: int = 0
    waits_for: set[str] = field(default_factory=set)  # other shards holding first copies of its duplicates


@dataclass
class Reuse:
    """What the resolution job found: per shard, its reused keys (in ``folder``) and what it waits for."""

    folder: str
    shards: dict[str, ShardReuse] = field(default_factory=dict)
    # The first pass's timings and engine counters of shards whose fusion commits in the second pass.
    held: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def n_duplicate(self) -> int:
        return sum(s.n_duplicate for s in self.shards.values())

    @property
    def n_cache(self) -> int:
        return sum(s.n_cache for s in self.shards.values())

    def file(self, shard: str) -> str | None:
        return f"{self.folder}/{shard}.parquet" if shard in self.shards else None


# --- the resolution job (Ray Data) --------------------------------------------------------
def _input_hashes(batch: pa.Table, storage: Storage, images_dir: str) -> Iterator[pa.Table]:
    """Ray Data UDF: planned shards → (shard, key, sha256) of their downloaded images."""
    for shard in batch["shard"].to_pylist():
        path = f"{images_dir}/{shard}.parquet"
        table = storage.read_table(path) if storage.exists(path) else pa.table({})
        if not {"sha256", "key", "status"} <= set(table.column_names):
            log.warning("shard %s: no sha256 in img2dataset's Parquet: its images are captioned as they come", shard)
            yield _GROUPED.empty_table()  # an empty block, so the grouping always has a schema
            continue
        ok = pc.and_(pc.equal(table["status"], "success"), pc.invert(pc.is_null(table["sha256"])))
        rows, seen = [], set()
        for key, sha in zip(table.filter(ok)["key"].to_pylist(), table.filter(ok)["sha256"].to_pylist(), strict=True):
            if key not in seen:  # a key listed twice: its first row, as the reader keeps
                seen.add(key)
                rows.append({"role": "input", "shard": shard, "key": str(key), "sha256": sha, "entry": None})
        yield pa.Table.from_pylist(rows, schema=_GROUPED)


def _cache_entries(batch: pa.Table, cache: CaptionCache) -> Iterator[pa.Table]:
    """Ray Data UDF: cache files → their entries."""
    storage = cache.storage()
    for path in batch["path"].to_pylist():
        t = storage.read_table(path).cast(CACHE_SCHEMA)
        yield t.add_column(0, "role", pa.array([CACHE] * t.num_rows, pa.string()))


def _assign(group: pa.Table, dedup: bool) -> pa.Table:
    """Ray Data UDF, one image (sha256): which copy is captioned, which reuse what."""
    rows = group.to_pylist()
    inputs = sorted((r for r in rows if r["role"] == "input"), key=lambda r: (r["shard"], r["key"]))
    cached = sorted((r for r in rows if r["role"] == CACHE), key=lambda r: (r["shard"], r["key"]))
    out = []
    if cached:
        c = cached[0]
        out = [
            {
                "shard": r["shard"],
                "key": r["key"],
                "caption_source": CACHE,
                "caption_from": c["key"],
                "caption_from_shard": c["shard"],
                "entry": c["entry"],
            }
            for r in inputs
        ]
    elif dedup and len(inputs) > 1:
        first = inputs[0]
        out = [
            {
                "shard": r["shard"],
                "key": r["key"],
                "caption_source": DUPLICATE,
                "caption_from": first["key"],
                "caption_from_shard": first["shard"],
                "entry": None,
            }
            for r in inputs[1:]
        ]
    return pa.Table.from_pylist(out, schema=REUSE_SCHEMA)


def _write_shard(group: pa.Table, storage: Storage, folder: str) -> pa.Table:
    """Ray Data UDF, one shard's reused keys → its file; returns its summary row."""
    shard = group["shard"][0].as_py()
    storage.write_table(f"{folder}/{shard}.parquet", group.sort_by("key"))
    sources = group["caption_source"].to_pylist()
    waits = {
        s
        for s, src in zip(group["caption_from_shard"].to_pylist(), sources, strict=True)
        if src == DUPLICATE and s != shard
    }
    return pa.table(
        {
            "shard": [shard],
            "n_duplicate": [sources.count(DUPLICATE)],
            "n_cache": [sources.count(CACHE)],
            "waits_for": [json.dumps(sorted(waits))],
        }
    )


def resolve(
    shards: Sequence[str], images_dir: str, storage: Storage, folder: str, *, dedup: bool, cache: CaptionCache | None
) -> Reuse:
    """Run the resolution job over ``shards``; its per-shard files go to ``folder``."""
    import ray.data

    cache_files = cache.files() if cache is not None else []
    if not shards or not (dedup or cache_files):
        return Reuse(folder)
    ctx = ray.data.DataContext.get_current()
    strategy = ctx.shuffle_strategy
    # Set before any dataset is made (each keeps the context it was made with): the sort-based
    # shuffle runs as plain tasks, seconds here, where the hash shuffle first starts its
    # aggregator actors (half a minute on a small machine).
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        n = len(shards)
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=min(n, 64)).map_batches(
            _input_hashes,  # type: ignore[arg-type]  # Ray's stubs: fn takes the batch alone
            fn_kwargs={"storage": storage, "images_dir": images_dir},
            batch_format="pyarrow",
            batch_size=1,
        )
        if cache_files:
            entries = ray.data.from_items(
                [{"path": p} for p in cache_files], override_num_blocks=min(len(cache_files), 64)
            )
            ds = ds.union(
                entries.map_batches(
                    _cache_entries,  # type: ignore[arg-type]  # Ray's stubs: fn takes the batch alone
                    fn_kwargs={"cache": cache},
                    batch_format="pyarrow",
                    batch_size=1,
                )
            )
        partitions = max(1, min(64, n))
        reused = ds.groupby("sha256", num_partitions=partitions).map_groups(
            _assign,  # type: ignore[arg-type]  # Ray's stubs: fn takes the batch alone
            fn_kwargs={"dedup": dedup},
            batch_format="pyarrow",
        )
        summary = reused.groupby("shard", num_partitions=partitions).map_groups(
            _write_shard,  # type: ignore[arg-type]  # Ray's stubs: fn takes the batch alone
            fn_kwargs={"storage": storage, "folder": folder},
            batch_format="pyarrow",
        )
        rows = summary.take_all()
    finally:
        ctx.shuffle_strategy = strategy
    out = Reuse(folder)
    for r in rows:
        out.shards[r["shard"]] = ShardReuse(int(r["n_duplicate"]), int(r["n_cache"]), set(json.loads(r["waits_for"])))
    return out


def read_shard_reuse(storage: Storage, path: str | None) -> dict[str, dict[str, Any]]:
    """key → its reuse row, for the shard's reader."""
    if not path:
        return {}
    return {r["key"]: r for r in storage.read_table(path).to_pylist()}


# --- at commit ----------------------------------------------------------------------------
def fill_duplicates(table: pa.Table, shard: str, read_committed) -> pa.Table:
    """Give each duplicate row of a shard's captions its first copy's caption fields.

    ``read_committed(shard)`` returns a committed captions table; the first copies are in
    this table or in shards committed before (the driver waits for them). A first copy
    whose image could not be read leaves its duplicates with ``model_error`` (retryable).
    """
    if "caption_source" not in table.column_names:
        return table
    rows = table.to_pylist()
    todo = [
        r for r in rows if r["caption_source"] == DUPLICATE and r["status"] == vocab.OK and r["vlm_caption"] is None
    ]
    if not todo:
        return table
    firsts: dict[str, dict[str, Any]] = {r["key"]: r for r in rows if r["caption_source"] != DUPLICATE}
    for other in sorted({r["caption_from_shard"] for r in todo} - {shard}):
        t = read_committed(other)
        wanted = pa.array(sorted({r["caption_from"] for r in todo if r["caption_from_shard"] == other}), pa.string())
        firsts.update({r["key"]: r for r in t.filter(pc.is_in(t["key"], value_set=wanted)).to_pylist()})
    for r in todo:
        first = firsts.get(r["caption_from"])
        if first is None or first["status"] not in REUSABLE | vocab.RETRYABLE:
            why = "not found" if first is None else f"status {first['status']}"
            r.update(
                status=vocab.MODEL_ERROR,
                reason=vocab.MODEL_ERROR,
                error=f"duplicate of {r['caption_from']}, whose caption is unusable ({why})",
            )
            continue
        r.update({f: first.get(f) for f in CAPTION_FIELDS}, n_prompt_tokens=0, n_output_tokens=0)
    return pa.Table.from_pylist(rows, schema=table.schema)
