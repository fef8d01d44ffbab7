"""The dry-run backend: no model, a fixed caption at once.

``vecap run --dry-run`` uses it for both model stages, so that every input shard is
read and decoded and every stage's bookkeeping runs before anyone pays for GPUs: it
finds broken shards and sizes the CPU side (and benchmarks the data path).
"""

from __future__ import annotations

from collections.abc import Sequence

from vecap.backends.base import ChatEngine, Generation, Request

DRY_CAPTION = "a dry-run caption"


class DryEngine(ChatEngine):
    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        return [
            Generation(text=DRY_CAPTION, finish_reason="stop", n_prompt_tokens=0, n_output_tokens=0) for _ in requests
        ]
