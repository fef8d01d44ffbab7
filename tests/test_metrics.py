"""Live metrics and logs of a real run: `vecap run --dashboard` on its own local Ray, its Prometheus
endpoint scraped, counters compared with the rows of the committed Parquet; the driver and worker
logs under the root."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SHARDS = ["00000", "00099"]  # a shard of the sample and the shard of bad images
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page: (name, labels, value)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m["name"], dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def total(samples, name: str, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """A metric summed over every series (every worker process) by the labels ``by``."""
    sums: Counter = Counter()
    for n, labels, value in samples:
        if n == name:
            sums[tuple(labels.get(k, "") for k in by)] += value
    return {k: v for k, v in sums.items() if v}


def parquet_counts(root: Path) -> dict[str, dict]:
    """What the committed Parquet of each stage holds: statuses, fallback reasons, tokens."""
    from vecap.stages.fuse import fallback_counts

    out = {}
    for stage, folder in (("caption", "captions"), ("fuse", "fused"), ("write", "vecap")):
        table = pq.read_table(root / folder)
        counts = {
            "statuses": Counter(table["status"].to_pylist()),
            "rows": table.num_rows,
        }
        if "n_prompt_tokens" in table.column_names:
            counts["prompt"] = sum(v or 0 for v in table["n_prompt_tokens"].to_pylist())
            counts["output"] = sum(v or 0 for v in table["n_output_tokens"].to_pylist())
        if stage == "fuse":
            counts["fallbacks"] = Counter(fallback_counts(table))
        out[stage] = counts
    return out


def _recipe(tmp_path: Path, root: Path, tiny_models) -> Path:
    from vecap.config import resolve_recipe

    data = yaml.safe_load(resolve_recipe("demo").read_text())
    data["root"] = str(root)
    data["caption"]["model"] = str(tiny_models["llava"])
    data["fuse"]["model"] = str(tiny_models["llama"])
    # Engine gauges exist only while their actor lives: small batches one at a time keep the caption
    # actor calling its engine for many seconds, long enough to be scraped live.
    data["caption"].update(batch_size=2, max_batches_in_flight=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# The CLI in a process of its own (its own local Ray), kept alive after the run until the test has
# scraped its node's endpoint: Ray's metrics go when its processes go.
_DRIVER = (
    "import sys; from vecap.cli import main; rc = main(sys.argv[1:]); "
    "print('VECAP-DONE', rc, flush=True); sys.stdin.readline()"
)


def test_prometheus_counters_equal_the_parquet_rows_and_logs_land_under_the_root(make_root, tiny_models, tmp_path):
    root = make_root("metrics")
    port = free_port()  # the dashboard's port is Ray's choice (8265, or the next free one)
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_metrics_report_interval_ms="1000")
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-c",
        _DRIVER,
        "run",
        "--dashboard",
        "--no-progress",
        "--config",
        str(_recipe(tmp_path, root, tiny_models)),
        "--shards",
        *SHARDS,
        "--set",
        f"ray.metrics_export_port={port}",
    ]
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.time() + 600
        live: set[str] = set()  # gauges of engine actors are seen while the actors live
        while "VECAP-DONE" not in (tmp_path / "out.txt").read_text():
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
            assert time.time() < deadline, "the run did not finish"
            try:
                live |= {n for n, _, _ in scrape(url)}
            except OSError:
                pass  # Ray is not up yet
            time.sleep(0.5)
        assert "VECAP-DONE 0" in (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()[-3000:]
        expected = parquet_counts(root)
        # Counters are reported every second here: poll until the last shard's counts arrive.
        deadline = time.time() + 120
        while True:
            samples = scrape(url)
            by_status = total(samples, "ray_vecap_samples_total", ("stage", "status"))
            want = {(s, k): float(v) for s, c in expected.items() for k, v in c["statuses"].items()}
            if by_status == want or time.time() > deadline:
                break
            time.sleep(2)
        assert by_status == want
        assert total(samples, "ray_vecap_samples_total", ("stage",)) == {
            (s,): float(c["rows"]) for s, c in expected.items()
        }
        fallbacks = {k: float(v) for k, v in expected["fuse"]["fallbacks"].items()}
        assert total(samples, "ray_vecap_fallbacks_total", ("reason",)) == {(k,): v for k, v in fallbacks.items()}
        tokens = total(samples, "ray_vecap_tokens_total", ("stage", "kind"))
        for stage in ("caption", "fuse"):
            for kind in ("prompt", "output"):
                assert tokens.get((stage, kind), 0.0) == expected[stage][kind]
        assert total(samples, "ray_vecap_shards_committed_total", ("stage",)) == {(s,): 2.0 for s in expected}
        assert not total(samples, "ray_vecap_shards_failed_total", ())
        starts = total(samples, "ray_vecap_engine_starts_total", ("stage", "backend"))
        assert starts == {("caption", "vllm"): 1.0, ("fuse", "vllm"): 1.0}
        requests = total(samples, "ray_vecap_engine_requests_total", ("stage",))
        assert requests[("caption",)] > 0
        assert total(samples, "ray_vecap_engine_batches_in_flight", ("stage",)) == {}  # all engine calls ended
        # vLLM's own statistics, copied from each engine that was called
        vllm_prompt = total(samples, "ray_vecap_vllm_prompt_tokens_total", ("stage",))
        assert set(vllm_prompt) == set(requests) and all(v > 0 for v in vllm_prompt.values())
        assert {"ray_vecap_vllm_kv_cache_usage_perc", "ray_vecap_vllm_num_requests_running"} <= live
        (tmp_path / "metrics.txt").write_text(urllib.request.urlopen(url, timeout=10).read().decode())
        # every metric the Grafana dashboard queries exists (those that only count trouble may not yet)
        dashboard = set(re.findall(r"ray_vecap_\w+", (REPO / "docs" / "grafana-dashboard.json").read_text()))
        trouble = {
            "ray_vecap_engine_restarts_total",
            "ray_vecap_shards_failed_total",
            "ray_vecap_vllm_prefix_cache_hits_total",
        }
        assert dashboard - trouble - live - {n for n, _, _ in samples} == set()

        # the terminal: the dashboard and the endpoint, vecap's progress, no Ray chatter
        terminal = (tmp_path / "err.txt").read_text()
        assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+\b", terminal) and f":{port}/metrics" in terminal
        for chatter in ("Started a local Ray instance", "streaming_executor", "Token authentication", "UserWarning"):
            assert chatter not in terminal
        run_id = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{6}) on", terminal)[1]
        logs = root / "logs" / run_id
        driver = (logs / "driver.log").read_text()
        assert f"run {run_id} on" in driver and "Started a local Ray instance" in driver  # Ray's messages are kept here
        assert "wall time" in driver  # the summary
        workers = {p.name: p.read_text() for p in logs.glob("worker-*.log")}
        assert any("caption engine (vllm) loaded" in t for t in workers.values()), sorted(workers)
        assert any("fuse engine (vllm) loaded" in t for t in workers.values()), sorted(workers)
        assert all(re.fullmatch(rf"worker-{re.escape(socket.gethostname())}-\d+\.log", n) for n in workers)
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its local Ray
        except ProcessLookupError:
            pass
        out.close()
        err.close()
