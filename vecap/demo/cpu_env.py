"""The environment vLLM needs on a CPU-only machine, offline, with caches in one folder.

Used by the tests and the benchmarks (the demo recipe sets the same through ``ray.env``).
"""

from __future__ import annotations

from pathlib import Path


def offline_cpu_env(cache_root: str | Path) -> dict[str, str]:
    cache_root = Path(cache_root)
    return {
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per engine
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in-process: starts in seconds
        "VLLM_LOGGING_LEVEL": "ERROR",
        "HF_HOME": str(cache_root / "hf"),
        "VLLM_CACHE_ROOT": str(cache_root / "vllm"),
    }
