"""Engines that fail on chosen samples, for the fault tests and ``bench.chaos``.

:class:`PoisonVLLMEngine` is a vLLM engine whose process dies on chosen samples: a poison input.

``caption.backend: vecap.demo.faulty:PoisonVLLMEngine`` with ``VECAP_POISON_KEYS=key1,key2``
in the stage's ``env``. When a call holds a poisoned key, the engine's process is SIGKILLed
as a kernel fault would kill it: the engine core's own process when vLLM runs it in a child
process (the GPU default), else the actor's. Nothing else differs from the ``vllm`` backend,
so everything the pipeline does about the death (detection, restart, isolation) is real.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import Future

from vecap.backends.base import ChatEngine, EngineFatal, EngineSpec, Generation, Request
from vecap.backends.vllm_engine import VLLMEngine

log = logging.getLogger(__name__)

POISON_ENV = "VECAP_POISON_KEYS"
DEAD_ENV = "VECAP_DEAD_KEYS"


class PoisonVLLMEngine(VLLMEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self.poison = {k for k in os.environ.get(POISON_ENV, "").split(",") if k}

    def submit(self, requests: Sequence[Request]) -> Future:
        poisoned = sorted(self.poison & {r.key for r in requests if r.key})
        if poisoned:
            victims = [p.pid for p in self.core_processes if p.pid is not None] or [os.getpid()]
            log.error("poison input %s: SIGKILL of engine process %s", poisoned, victims)
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        return super().submit(requests)


class DeadDeviceEngine(ChatEngine):
    """A model-less engine (``backend: vecap.demo.faulty:DeadDeviceEngine``) that answers every request
    with a fixed caption, except that a call holding a key of ``VECAP_DEAD_KEYS`` fails as a lost GPU
    does (:class:`EngineFatal`, every time, after a restart too). For the circuit breaker's test: the
    plumbing around fatal errors, without a model's start-up per restart."""

    max_concurrent_calls = 4

    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        self.dead = {k for k in os.environ.get(DEAD_ENV, "").split(",") if k}

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        if self.dead & {r.key for r in requests if r.key}:
            raise EngineFatal("CUDA error: an illegal memory access was encountered (DeadDeviceEngine)")
        return [Generation(text="A red bus on a bridge.", finish_reason="stop", n_output_tokens=7) for _ in requests]
