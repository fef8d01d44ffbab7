"""How far is the run on a root? Answered from the files alone, from any machine that can read it.

Everything comes from what the pipeline writes anyway: the input shards (``images/``),
the done markers (``<stage>/_done/NNNNN.json``: counts, statuses, fallbacks, tokens,
``committed_at``), part folders of shards in progress (``<stage>/_parts/NNNNN/``), the last
run's manifest (``<stage>/_run.json``: totals, ``failed_shards``) and the lease
(``_lease.json``: run id, host, pid, start and heartbeat). No Ray, no driver needed, so it
works for a running run, a finished one and one that died.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from vecap.layout import DRY_RUN_DIR, PARTS_DIR, STAGE_DIRS, STAGES, Layout
from vecap.lease import _dead_here
from vecap.outputs import StageOutput
from vecap.reader import list_shards
from vecap.stats import ShardStats
from vecap.storage import Storage


@dataclass
class LeaseInfo:
    """The run holding the root, from ``_lease.json``."""

    run_id: str
    host: str | None
    pid: int | None
    started_at: float | None
    heartbeat_age_s: float | None
    ttl_s: float | None
    dead: str | None = None  # why it looks dead, None while it looks alive


@dataclass
class StageProgress:
    """One stage on the root: committed shards and what they hold, work in progress, failures."""

    stage: str
    folder: str
    done: int = 0
    samples: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    in_progress: dict[str, int] = field(default_factory=dict)  # shard → part files written so far
    failed: dict[str, str] = field(default_factory=dict)  # the last run's failed shards not done since
    run_shards: int = 0  # committed by the running run (since its lease's start)
    run_samples: int = 0
    samples_per_s: float | None = None  # the running run's, else the last run's
    eta_s: float | None = None  # the running run's, from its shards per second
    last_commit: float | None = None
    last_run: dict[str, Any] | None = None  # from _run.json: run_id, finished_at, seconds, samples_per_s


@dataclass
class RunStatus:
    root: str
    now: float
    input_shards: int
    stages: list[StageProgress]
    lease: LeaseInfo | None
    log_dir: str | None

    @property
    def running(self) -> bool:
        return self.lease is not None and self.lease.dead is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "running": self.running}


def _ts(value: str | None) -> float | None:
    """``2026-01-02T03:04:05Z`` (markers, manifests) → epoch seconds."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _read_json(storage: Storage, path: str) -> dict[str, Any] | None:
    try:
        data = storage.read_json(path)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_lease(storage: Storage, layout: Layout, now: float) -> LeaseInfo | None:
    held = _read_json(storage, layout.lease)
    if held is None:
        return None
    beat = held.get("heartbeat_at")
    age = now - float(beat) if isinstance(beat, (int, float)) else None
    ttl = held.get("ttl_s")
    info = LeaseInfo(
        run_id=str(held.get("run_id")),
        host=held.get("host"),
        pid=held.get("pid"),
        started_at=held.get("started_at"),
        heartbeat_age_s=age,
        ttl_s=ttl,
    )
    if age is None:
        info.dead = "no heartbeat time in the lease"
    elif isinstance(ttl, (int, float)) and age > ttl:
        info.dead = f"no heartbeat for {age:.0f}s (expires after {ttl:.0f}s); the next run takes the root over"
    elif _dead_here(held):
        info.dead = f"its process {held.get('pid')} is gone on this host; the next run takes the root over"
    return info


def load_status(
    root: str, storage_options: dict[str, Any] | None = None, *, dry_run: bool = False, now: float | None = None
) -> RunStatus:
    """Read a root's progress (``dry_run``: the dry run's outputs under ``<root>/_dry_run``)."""
    root = root.rstrip("/") or "/"
    storage = Storage.for_path(root, storage_options)
    layout = Layout(f"{root}/{DRY_RUN_DIR}", input_root=root) if dry_run else Layout(root)
    now = time.time() if now is None else now
    n_input = len(list_shards(layout.images, storage=storage))
    lease = read_lease(storage, layout, now)
    markers = {s: StageOutput(layout, s, storage).markers() for s in STAGES}
    done = {s: sorted(markers[s]) for s in STAGES}
    running_since = lease.started_at if lease is not None and lease.dead is None else None
    stages = []
    for s in STAGES:
        p = StageProgress(s, layout.stage(s), done=len(done[s]))
        per_shard = {shard: ShardStats.of_marker(markers[s][shard]) for shard in done[s]}
        total = sum(per_shard.values(), ShardStats())
        p.samples, p.prompt_tokens, p.output_tokens = total.rows, total.prompt_tokens, total.output_tokens
        p.statuses, p.fallbacks = dict(total.statuses), dict(total.fallbacks)
        for shard in done[s]:
            stats = markers[s][shard]
            n = per_shard[shard].rows
            committed = _ts(stats.get("committed_at"))
            if committed is not None:
                p.last_commit = max(p.last_commit or committed, committed)
                # second resolution: a shard committed in the run's first second counts for it
                if running_since is not None and committed >= int(running_since):
                    p.run_shards += 1
                    p.run_samples += n
        parts_dir = layout.join(STAGE_DIRS[s], PARTS_DIR)
        for shard in storage.names(parts_dir):
            if shard not in done[s] and not shard.startswith("."):
                p.in_progress[shard] = sum(n.endswith(".parquet") for n in storage.names(f"{parts_dir}/{shard}"))
        manifest = _read_json(storage, layout.run_file(s))
        if manifest is not None:
            p.last_run = {k: manifest.get(k) for k in ("run_id", "finished_at", "seconds", "samples_per_s", "dry_run")}
            p.failed = {k: str(v) for k, v in (manifest.get("failed_shards") or {}).items() if k not in done[s]}
        if running_since is not None:
            elapsed = max(now - running_since, 1e-9)
            p.samples_per_s = p.run_samples / elapsed
            if p.run_shards:
                p.eta_s = max(n_input - p.done, 0) / (p.run_shards / elapsed)
        elif p.last_run is not None:
            p.samples_per_s = p.last_run.get("samples_per_s")
        stages.append(p)
    run_id = lease.run_id if lease is not None else next((p.last_run["run_id"] for p in stages if p.last_run), None)
    return RunStatus(root, now, n_input, stages, lease, layout.logs(run_id) if run_id else None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def render_status(st: RunStatus) -> str:
    """The status as a few lines of plain text (``vecap status``)."""
    lines = [f"root     {st.root} ({st.input_shards} input shard(s))"]
    lease = st.lease
    if lease is not None:
        where = f"host {lease.host}, pid {lease.pid}" + (" (this host)" if lease.host == socket.gethostname() else "")
        started = f", started {_duration(st.now - lease.started_at)} ago" if lease.started_at else ""
        beat = (
            f"heartbeat {_duration(lease.heartbeat_age_s)} ago" if lease.heartbeat_age_s is not None else "no heartbeat"
        )
        state = "running" if lease.dead is None else f"LOOKS DEAD: {lease.dead}"
        lines.append(f"run      {lease.run_id} on {where}{started}; {beat} — {state}")
    else:
        last = max(
            (p.last_run for p in st.stages if p.last_run), key=lambda r: r.get("finished_at") or "", default=None
        )
        if last is not None:
            lines.append(
                f"run      none holds the root; the last run, {last.get('run_id')}, finished {last.get('finished_at')} "
                f"after {_duration(last.get('seconds'))}"
            )
        else:
            lines.append("run      none holds the root, and none has finished on it")
    if st.log_dir:
        lines.append(f"logs     {st.log_dir}/")
    rate_label = "samples/s" + ("" if st.running else "*")
    lines.append("")
    lines.append(
        f"{'stage':<8} {'done':>9} {'samples':>8} {rate_label:>10} "
        f"{'ETA':>7} {'in progress':>11} {'failed':>6}  statuses | fallbacks"
    )
    for p in st.stages:
        rate = f"{p.samples_per_s:.2f}" if p.samples_per_s is not None else "-"
        eta = _duration(p.eta_s) if p.eta_s is not None else ("done" if p.done >= st.input_shards > 0 else "-")
        detail = _counts(p.statuses) + (f" | {_counts(p.fallbacks)}" if p.fallbacks else "")
        lines.append(
            f"{p.stage:<8} {f'{p.done}/{st.input_shards}':>9} {p.samples:>8} {rate:>10} {eta:>7} "
            f"{len(p.in_progress):>11} {len(p.failed):>6}  {detail or '-'}"
        )
    if not st.running:
        lines.append("* of the last finished run (no run holds the root)")
    for p in st.stages:
        if p.in_progress:
            parts = ", ".join(f"{s} ({n} part(s))" for s, n in sorted(p.in_progress.items()))
            lines.append(
                f"in progress  {p.stage}: {parts}"
                + ("" if st.running else " — left by a run that stopped; redone by the next")
            )
    for p in st.stages:
        by_reason: dict[str, list[str]] = {}
        for shard, why in sorted(p.failed.items()):
            by_reason.setdefault(why, []).append(shard)
        for why, shards in by_reason.items():
            listed = ", ".join(shards[:6]) + (f" and {len(shards) - 6} more" if len(shards) > 6 else "")
            lines.append(f"FAILED   {p.stage} {listed} (run {p.last_run and p.last_run.get('run_id')}): {why}")
    return "\n".join(lines)
