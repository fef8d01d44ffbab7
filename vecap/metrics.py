"""Live metrics through Ray's metrics API: what a run did so far, on every node's Prometheus endpoint.

Ray exports custom metrics of every worker on its node's metrics endpoint
(``http://<node>:<metrics_export_port>/metrics``), which the Ray dashboard and Grafana
read; Ray prefixes their names with ``ray_`` and counters get ``_total``
(``vecap_samples`` → ``ray_vecap_samples_total``). ``docs/grafana-dashboard.json`` uses
these names.

Samples, statuses, fallbacks, tokens and shards are counted where a shard is committed
(:func:`record_commit`, from the shard's stats), so the counters equal the rows in the
Parquet; a shard recommitted (``--retry-failed``, ``--overwrite``) counts again. Engine
actors report start-ups, restarts, batches in flight and, for vLLM, the engine's own
statistics (:class:`EngineMetrics`).

Metrics never fail the pipeline: outside Ray (no ``ray`` imported) nothing is recorded,
and an error while recording is logged once and ignored.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

# Names as recorded; Ray exports them as ray_<name> (+ _total for counters).
SAMPLES = "vecap_samples"  # counter {stage, status}: committed rows
FALLBACKS = "vecap_fallbacks"  # counter {stage, reason}: VeC captions that are not the LLM's
TOKENS = "vecap_tokens"  # counter {stage, kind=prompt|output}
SHARDS_COMMITTED = "vecap_shards_committed"  # counter {stage}
SHARDS_FAILED = "vecap_shards_failed"  # counter {}: shards the driver gave up on in a run
ENGINE_STARTS = "vecap_engine_starts"  # counter {stage, backend}: engines loaded (EngineWorker.__init__)
ENGINE_RESTARTS = "vecap_engine_restarts"  # counter {stage, backend}: engines loaded in a restarted actor
ENGINE_START_SECONDS = "vecap_engine_start_seconds"  # histogram {stage}: time to load an engine
BATCHES_IN_FLIGHT = "vecap_engine_batches_in_flight"  # gauge {stage}: per engine actor
ENGINE_REQUESTS = "vecap_engine_requests"  # counter {stage}: requests handed to engines
ENGINE_BATCH_SECONDS = "vecap_engine_batch_seconds"  # histogram {stage}: one engine call
VLLM_PREFIX = "vecap_vllm_"  # vLLM's own statistics: vllm:<name> → vecap_vllm_<name> {stage, vLLM's labels}

EXPORT_EVERY_S = 2.0  # vLLM statistics: copied at most this often
_SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800]
_metrics: dict[str, Any] = {}
_warned = False


def _enabled() -> bool:
    """Record only inside a Ray process: importing Ray just to count would cost seconds."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kwargs: Any) -> Any:
    """One Ray metric per name and process, created on first use."""
    metric = _metrics.get(name)
    if metric is None:
        from ray.util import metrics

        cls = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[kind]
        metric = _metrics[name] = cls(name, description=description, tag_keys=tag_keys, **kwargs)
    return metric


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    global _warned
    try:
        yield
    except Exception as err:  # noqa: BLE001 - metrics are never worth a failed shard
        if not _warned:
            _warned = True
            log.warning("metrics: %s failed (%s: %s); metrics may be incomplete", what, type(err).__name__, err)


def _inc(name: str, description: str, value: float, tags: dict[str, str]) -> None:
    if value:
        _metric("counter", name, description, tuple(tags)).inc(float(value), tags=tags)


def endpoints_line() -> str:
    """Where to watch this process's Ray: the dashboard and the Prometheus endpoint of the driver's node."""
    import ray

    node = ray._private.worker.global_worker.node  # not public: the node this driver runs on
    dashboard = ray._private.worker.get_dashboard_url()
    port = getattr(node, "metrics_export_port", None)
    ip = getattr(node, "node_ip_address", "127.0.0.1")
    parts = [f"Ray dashboard: http://{dashboard}" if dashboard else "Ray dashboard: off (ray.dashboard / --dashboard)"]
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if dashboard and is_token_auth_enabled():
            parts[0] += " (it asks for Ray's token: `ray get-auth-token`)"
    except Exception:  # noqa: BLE001 - a private API of Ray: only a hint
        pass
    parts.append(f"Prometheus metrics: http://{ip}:{port}/metrics" if port else "Prometheus metrics: not exported")
    return "; ".join(parts)


# --- where shards are committed (finalize tasks) and failed (driver) -------------------------------
def record_commit(done: Mapping[str, Mapping[str, Any]]) -> None:
    """Count one committed shard from each stage's stats (what its marker holds)."""
    if not _enabled():
        return
    with _guard("record_commit"):
        for stage, stats in done.items():
            for status, n in (stats.get("statuses") or {}).items():
                _inc(SAMPLES, "samples committed, by stage and status", n, {"stage": stage, "status": str(status)})
            for reason, n in (stats.get("fallbacks") or {}).items():
                _inc(FALLBACKS, "VeC captions that fell back, by reason", n, {"stage": stage, "reason": str(reason)})
            for kind in ("prompt", "output"):
                _inc(
                    TOKENS,
                    "model tokens of committed samples",
                    stats.get(f"{kind}_tokens") or 0,
                    {"stage": stage, "kind": kind},
                )
            _inc(SHARDS_COMMITTED, "shards committed, by stage", 1, {"stage": stage})


def record_failed(n: int = 1) -> None:
    """Count shards the driver gave up on (recorded in ``_run.json``'s ``failed_shards``)."""
    if not _enabled():
        return
    with _guard("record_failed"):
        _inc(SHARDS_FAILED, "shards that failed and were not committed", n, {})


# --- engine actors -----------------------------------------------------------------------------
class EngineMetrics:
    """What one engine actor reports: its start, its batches, and the engine's own statistics."""

    def __init__(self, stage: str, backend: str) -> None:
        self.stage = stage
        self.backend = backend
        self.in_flight = 0
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # vLLM counters already exported
        self._vllm = True  # until the engine turns out to hold no vLLM ``LLM`` with statistics
        self._exported_at = 0.0

    @classmethod
    def for_worker(cls, worker: Any, backend: str, start_s: float | None) -> EngineMetrics:
        """Metrics of an ``EngineWorker`` whose engine just loaded in ``start_s`` seconds."""
        stage = getattr(worker, "stage", None) or str(getattr(worker, "flag", "")).removeprefix("needs_") or "engine"
        self = cls(stage, backend)
        restarted = False
        if _enabled():
            with _guard("engine start"):
                import ray

                tags = {"stage": stage, "backend": backend}
                _inc(ENGINE_STARTS, "engines loaded", 1, tags)
                ctx = ray.get_runtime_context()
                if ctx.get_actor_id() is not None and ctx.was_current_actor_reconstructed:
                    restarted = True
                    _inc(ENGINE_RESTARTS, "engines loaded again in a restarted actor", 1, tags)
                if start_s is not None:
                    _metric(
                        "histogram",
                        ENGINE_START_SECONDS,
                        "seconds to load an engine",
                        ("stage",),
                        boundaries=_SECONDS_BOUNDARIES,
                    ).observe(start_s, tags={"stage": stage})
        log.info(
            "%s engine (%s) loaded in %.1fs%s",
            stage,
            backend,
            start_s or 0.0,
            " in a restarted actor" if restarted else "",
        )
        return self

    @contextlib.contextmanager
    def batch(self, n_requests: int, engine: Any = None) -> Iterator[None]:
        """Around one engine call: batches in flight, requests, call time; then the engine's statistics."""
        on = _enabled()
        self._set_in_flight(+1, on)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._set_in_flight(-1, on)
            if on:
                with _guard("engine batch"):
                    tags = {"stage": self.stage}
                    _inc(ENGINE_REQUESTS, "requests handed to engines", n_requests, tags)
                    _metric(
                        "histogram",
                        ENGINE_BATCH_SECONDS,
                        "seconds per engine call",
                        ("stage",),
                        boundaries=_SECONDS_BOUNDARIES,
                    ).observe(time.perf_counter() - t0, tags=tags)
                if engine is not None:
                    self.export_engine_stats(engine)

    def _set_in_flight(self, delta: int, on: bool) -> None:
        self.in_flight += delta
        if on:
            with _guard("batches in flight"):
                _metric("gauge", BATCHES_IN_FLIGHT, "engine calls in progress", ("stage",)).set(
                    self.in_flight, tags={"stage": self.stage}
                )

    def export_engine_stats(self, engine: Any) -> None:
        """vLLM's statistics (``LLM.get_metrics()``) as Ray metrics ``vecap_vllm_<name>``.

        vLLM's offline ``LLM`` keeps them in the process's prometheus_client registry, which
        nothing scrapes inside a Ray actor; they are copied after each engine call: gauges as
        gauges, counters and histograms' sum and count as counters (by their increase).
        """
        llm = getattr(engine, "llm", None)
        if not self._vllm or llm is None or not hasattr(llm, "get_metrics"):
            return
        if time.monotonic() - self._exported_at < EXPORT_EVERY_S:
            return  # Ray reports every few seconds: copying more often only costs time
        self._exported_at = time.monotonic()
        try:
            snapshot = llm.get_metrics()
        except Exception as err:  # noqa: BLE001 - e.g. stats off (disable_log_stats=True)
            log.info("vLLM statistics not exported: %s", err or type(err).__name__)
            self._vllm = False
            return
        with _guard("vLLM statistics"):
            for m in snapshot:
                self._export_one(m)

    def _export_one(self, m: Any) -> None:
        base = VLLM_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", m.name.removeprefix("vllm:"))
        labels = {re.sub(r"[^a-zA-Z0-9_]", "_", str(k)): str(v) for k, v in (m.labels or {}).items()}
        labels.pop("stage", None)
        tags = {"stage": self.stage, **dict(sorted(labels.items()))}
        description = f"vLLM {m.name}"
        if hasattr(m, "buckets"):  # a histogram: its sum and count
            values = {f"{base}_sum": m.sum, f"{base}_count": m.count}
        elif hasattr(m, "values"):  # a vector of counters (speculative decoding per position): skipped
            return
        elif type(m).__name__ == "Gauge":
            metric = _metric("gauge", base, description, tuple(tags))
            if tuple(metric._tag_keys) == tuple(tags):
                metric.set(float(m.value), tags=tags)
            return
        else:
            values = {base: m.value}
        for name, value in values.items():
            key = (name, tuple(tags.items()))
            delta = float(value) - self._last.get(key, 0.0)
            self._last[key] = float(value)
            if delta > 0:
                metric = _metric("counter", name, description, tuple(tags))
                if tuple(metric._tag_keys) == tuple(tags):  # vLLM changed a metric's labels: skip it
                    metric.inc(delta, tags=tags)
