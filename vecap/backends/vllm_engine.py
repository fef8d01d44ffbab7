"""vLLM offline engine, held for the life of the actor and fed continuously.

``LLM.generate`` on one batch at a time drains the engine at every batch boundary: the last
long outputs run with a nearly empty batch, and the next batch waits. Instead one feeder
thread owns the engine: it adds the requests of every batch handed to :meth:`submit` as
they arrive and steps the engine while any request is unfinished, so with several batches
in flight (the stage actor runs them concurrently) the running set is refilled as
sequences finish. Prefix caching is on by default: the fixed instructions of a prompt are
computed once and reused by every sample.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vecap.backends.base import ChatEngine, EngineFatal, EngineSpec, Generation, Request, load_chat_renderer

log = logging.getLogger(__name__)


@dataclass
class _Call:
    """One submitted batch: its future and the generations gathered so far."""

    future: Future
    results: list[Generation | None]
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = sum(r is None for r in self.results)

    def settle(self, index: int, gen: Generation) -> None:
        self.results[index] = gen
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(list(self.results))


class VLLMEngine(ChatEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        # Stats on: vecap.metrics exports them through Ray (LLM() turns them off by default).
        kwargs = {"enable_prefix_caching": True, "seed": 0, "disable_log_stats": False}
        if spec.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": 1}
        kwargs.update(spec.engine_kwargs)
        self.llm = LLM(model=spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, **kwargs)
        self._render, _ = load_chat_renderer(spec.model, spec.trust_remote_code)
        self._inbox: queue.SimpleQueue[tuple[list[Request], Future]] = queue.SimpleQueue()
        self._dead: BaseException | None = None
        self._max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # Cumulative counters (see stats()): steps, steps with fewer sequences than the engine
        # could run, sequences summed over steps, seconds inside step().
        self._counters = {"steps": 0, "underfull_steps": 0, "seq_steps": 0, "busy_s": 0.0}
        self._feeder = threading.Thread(target=self._feed, name="vllm-feeder", daemon=True)
        self._feeder.start()

    def _input(self, r: Request) -> tuple[Any, Any]:
        s = self.spec.sampling
        prompt = self._render(r.messages)
        params = self._sampling_params(
            max_tokens=s.max_tokens_for(r.seed),
            temperature=s.temperature,
            top_p=s.top_p,
            seed=r.seed if s.temperature > 0 else None,
            ignore_eos=s.synthetic_lengths is not None,
        )
        return ({"prompt": prompt, "multi_modal_data": {"image": r.image}} if r.image is not None else prompt), params

    def submit(self, requests: Sequence[Request]) -> Future:
        future: Future = Future()
        if self._dead is not None:
            future.set_exception(EngineFatal(f"engine is dead: {self._dead}"))
        elif not requests:
            future.set_result([])
        else:
            self._inbox.put((list(requests), future))
        return future

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self.submit(requests).result()

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        return self._generate(requests)  # per-request errors are isolated by the feeder itself

    def _feed(self) -> None:
        """The feeder thread: add arriving requests, step the engine, hand back finished batches."""
        engine = self.llm.llm_engine
        running: dict[str, tuple[_Call, int]] = {}
        while True:
            # Block for work only when the engine has nothing to run.
            items = [self._inbox.get()] if not running else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for requests, future in items:
                call = _Call(future, [None] * len(requests))
                for i, r in enumerate(requests):
                    try:
                        prompt, params = self._input(r)
                        # The chat template already holds BOS and the other special tokens.
                        rid = f"vecap-{uuid.uuid4().hex}"
                        engine.add_request(rid, prompt, params, tokenization_kwargs={"add_special_tokens": False})
                        running[rid] = (call, i)  # outputs carry this (external) id
                    except Exception as err:  # noqa: BLE001 - a request the engine refuses is that row's error
                        call.settle(i, Generation(text=None, error=f"{type(err).__name__}: {err}"[:500]))
            if not running:
                continue
            t0 = time.perf_counter()
            try:
                outputs = engine.step()
            except BaseException as err:  # noqa: BLE001 - the engine is gone: fail every call in flight
                self._dead = err
                log.error("vLLM engine failed: %s: %s", type(err).__name__, err)
                fatal = EngineFatal(f"{type(err).__name__}: {err}"[:500])
                for call, _ in running.values():
                    if not call.future.done():
                        call.future.set_exception(fatal)
                while True:
                    try:
                        _, future = self._inbox.get_nowait()
                        future.set_exception(fatal)
                    except queue.Empty:
                        return
            c = self._counters
            c["busy_s"] += time.perf_counter() - t0
            c["steps"] += 1
            c["seq_steps"] += min(len(running), self._max_seqs)
            c["underfull_steps"] += len(running) < self._max_seqs
            for out in outputs:
                rid = out.request_id if out.request_id in running else out.request_id.rsplit("-", 1)[0]
                if not out.finished or rid not in running:
                    continue
                call, i = running.pop(rid)
                comp = out.outputs[0]
                call.settle(
                    i,
                    Generation(
                        text=comp.text,
                        finish_reason=comp.finish_reason,
                        n_prompt_tokens=len(out.prompt_token_ids or []),
                        n_output_tokens=len(comp.token_ids),
                    ),
                )

    def stats(self) -> dict[str, float]:
        return dict(self._counters)

    def close(self) -> None:
        del self.llm
