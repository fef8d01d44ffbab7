"""The Ray a run uses: a cluster it connects to (``ray.address`` / ``RAY_ADDRESS``) or a new
local one, and the Ray Data settings every stream of the run shares."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from vecap import metrics
from vecap.config import PipelineConfig
from vecap.runlog import worker_runtime_env

log = logging.getLogger(__name__)


def ray_address(cfg: PipelineConfig) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def start_local_ray(attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init(address="local", ...)``, tried again when the new node times out during start-up
    (on a loaded machine Ray's raylet can give up waiting for its own agents: a transient failure)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as err:  # noqa: BLE001 - only Ray's start-up time-out is retried
            if attempt == attempts or "timed out during startup" not in str(err):
                raise
            log.warning("the local Ray did not start (%s); starting it again (%d/%d)", err, attempt + 1, attempts)
            ray.shutdown()
            time.sleep(2 * attempt)


def init_ray(cfg: PipelineConfig) -> str:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, else start a *new* local Ray; says which."""
    import ray

    if ray.is_initialized():
        where = "the Ray already initialised in this process"
    else:
        env = {k: str(v) for k, v in cfg.ray.env.items()}
        os.environ.update(env)
        runtime_env = worker_runtime_env({"env_vars": env} if env else None)  # + each worker's log file
        address = ray_address(cfg)
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.ray.log_to_driver)
            where = f"the Ray cluster at {address}"
        else:
            # address="local": never attach to a cluster started (or crashed) on this machine.
            start_local_ray(
                num_cpus=cfg.ray.num_cpus,
                object_store_memory=cfg.ray.object_store_memory_mb * 1024 * 1024,
                include_dashboard=cfg.ray.dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=cfg.ray.dashboard_port,
                _metrics_export_port=cfg.ray.metrics_export_port,
                runtime_env=runtime_env,
                log_to_driver=cfg.ray.log_to_driver,
            )
            where = f"a new local Ray ({cfg.ray.num_cpus} logical CPUs)"
    if cfg.ray.dashboard or cfg.ray.metrics_export_port:
        log.info("%s", metrics.endpoints_line())
    res = ray.cluster_resources()
    where += f": {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs, {len(ray.nodes())} node(s)"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over samples with rate and ETA
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False
    # An engine actor whose start-up fails (a hub rate limit, a node without the weights yet) is
    # retried a bounded number of times instead of failing the whole job.
    ctx.actor_init_retry_on_errors = cfg.faults.actor_start_retries > 0
    ctx.actor_init_max_retries = cfg.faults.actor_start_retries
    return where
