"""Where every file of a dataset root lives: the on-disk contract, in one place.

```
<root>/images/            NNNNN.tar NNNNN.parquet NNNNN_stats.json   input (img2dataset, as it comes)
<root>/captions/          NNNNN.parquet                               stage caption
<root>/captions/_done/    NNNNN.json                                  done markers (the shard's stats)
<root>/fused/             NNNNN.parquet   + _done/                    stage fuse
<root>/vecap/             NNNNN.parquet   + _done/                    stage write: one row per key
<root>/clip/              NNNNN.tar sizes.json                        stage write: CLIP-ready webdataset
<root>/<stage>/_parts/    NNNNN/<part>.parquet                        work in progress (merged, then removed)
<root>/captions/_reuse/   <run>/NNNNN.parquet                         a run's duplicate and cached keys
<root>/<stage>/_run.json                                              the last run's config, versions, totals
<root>/_lease.json                                                    the run that holds the root
```

``pd.read_parquet("<root>/<stage>")`` reads every row of a stage and nothing else:
pyarrow's dataset discovery skips names that start with ``_`` or ``.``, so markers,
parts and manifests live under such names, and the tars (with ``sizes.json``, which
open_clip reads beside them) live in their own folder.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("caption", "fuse", "write")
STAGE_DIRS = {"caption": "captions", "fuse": "fused", "write": "vecap"}
IMAGES_DIR = "images"
CLIP_DIR = "clip"
DONE_DIR = "_done"
PARTS_DIR = "_parts"
REUSE_DIR = "_reuse"  # captions/_reuse/<run id>/NNNNN.parquet: a run's reused keys per shard (vecap.reuse)
RUN_FILE = "_run.json"
SIZES_FILE = "sizes.json"
LEASE_FILE = "_lease.json"
LOGS_DIR = "logs"
DRY_RUN_DIR = "_dry_run"  # a dry run's outputs: <root>/_dry_run/<stage>/...
LEGACY_STATS_SUFFIX = "_stats.json"  # markers of layout 1 (vecap 0.1), beside the Parquet


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset root; ``root`` is a local path or a URI (``s3://bucket/run1``), no trailing slash."""

    root: str
    input_root: str | None = None  # where images/ is, when not under root (a dry run's outputs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", str(self.root).rstrip("/") or "/")

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @property
    def images(self) -> str:
        return f"{self.input_root.rstrip('/')}/{IMAGES_DIR}" if self.input_root else self.join(IMAGES_DIR)

    def stage(self, step: str) -> str:
        """The folder of a stage's Parquet (``captions``, ``fused``, ``vecap``)."""
        return self.join(STAGE_DIRS[step])

    def parquet(self, step: str, shard: str) -> str:
        return self.join(STAGE_DIRS[step], f"{shard}.parquet")

    def done_dir(self, step: str) -> str:
        return self.join(STAGE_DIRS[step], DONE_DIR)

    def marker(self, step: str, shard: str) -> str:
        """The shard's done marker: its stats, written last."""
        return self.join(STAGE_DIRS[step], DONE_DIR, f"{shard}.json")

    def parts(self, step: str, shard: str | None = None) -> str:
        """A shard's part files (every shard's when ``shard`` is None)."""
        return self.join(STAGE_DIRS[step], PARTS_DIR, *([shard] if shard else []))

    def reuse(self, run_id: str | None = None) -> str:
        """The caption reuse plan of a run (every run's when ``run_id`` is None)."""
        return self.join(STAGE_DIRS["caption"], REUSE_DIR, *([run_id] if run_id else []))

    def run_file(self, step: str) -> str:
        return self.join(STAGE_DIRS[step], RUN_FILE)

    @property
    def clip(self) -> str:
        return self.join(CLIP_DIR)

    def tar(self, shard: str) -> str:
        return self.join(CLIP_DIR, f"{shard}.tar")

    @property
    def sizes(self) -> str:
        return self.join(CLIP_DIR, SIZES_FILE)

    @property
    def lease(self) -> str:
        return self.join(LEASE_FILE)

    def logs(self, run_id: str) -> str:
        return self.join(LOGS_DIR, run_id)
