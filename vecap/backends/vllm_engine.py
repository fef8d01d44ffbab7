"""vLLM offline engine, held for the life of the actor and fed continuously.

``LLM.generate`` on one batch at a time drains the engine at every batch boundary: the last
long outputs run with a nearly empty batch, and the next batch waits. Instead one feeder
thread owns the engine: it adds the requests of every batch handed to :meth:`submit` as
they arrive and steps the engine while any request is unfinished, so with several batches
in flight (the stage actor runs them concurrently) the running set is refilled as
sequences finish. Prefix caching is on by default: the fixed instructions of a prompt are
computed once and reused by every sample.

**The engine core's own process.** vLLM's default (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, what
runs on a GPU) puts the engine core in a child process of the actor. When that process dies
(SIGKILL, OOM kill, a segfault in a kernel), vLLM 0.32's synchronous client marks the engine
dead but never wakes a caller blocked in ``step()``, so a call would wait for the hung-call
watchdog. A watcher thread waits on the engine-core processes' sentinels instead and, the
moment one exits, fails every call in flight with :class:`EngineFatal` naming the process and
its signal; the actor then exits and Ray restarts it at once. With the engine core in the
actor's own process there is nothing to watch: its death is the actor's.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import Any

from vecap.backends.base import (
    ChatEngine,
    EngineFatal,
    EngineSpec,
    Generation,
    Progress,
    Request,
    is_fatal,
    load_chat_renderer,
)

log = logging.getLogger(__name__)


@dataclass
class _Call:
    """One submitted batch: its future, the generations gathered so far, tokens of each request."""

    future: Future
    results: list[Generation | None]
    tokens: list[int] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = sum(r is None for r in self.results)
        self.tokens = [0] * len(self.results)

    def settle(self, index: int, gen: Generation) -> None:
        self.results[index] = gen
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(list(self.results))

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


def engine_core_processes(llm: Any) -> list[BaseProcess]:
    """The engine-core processes vLLM started for ``llm``; [] when the core runs in this process.

    vLLM keeps them in its client's background resources (``CoreEngineProcManager.processes``,
    multiprocessing ``Process`` objects, vLLM 0.32); the multiprocess tests fail if that moves.
    """
    client = getattr(llm.llm_engine, "engine_core", None)
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    return list(getattr(manager, "processes", None) or [])


def describe_exit(pid: int | None, exitcode: int | None) -> str:
    """'engine core process 123 exited with signal 9 (SIGKILL)', from a multiprocessing exit code."""
    if exitcode is None:
        how = "exited (exit status not known)"
    elif exitcode < 0:
        try:
            how = f"exited with signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            how = f"exited with signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"engine core process {pid} {how}"


class VLLMEngine(ChatEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        # Stats on: vecap.metrics exports them through Ray (LLM() turns them off by default).
        kwargs: dict[str, Any] = {"enable_prefix_caching": True, "seed": 0, "disable_log_stats": False}
        if spec.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": 1}
        kwargs.update(spec.engine_kwargs)
        self.llm = LLM(
            model=spec.model,
            dtype=spec.dtype,  # type: ignore[arg-type]  # vLLM checks the name
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
        self._render, _ = load_chat_renderer(spec.model, spec.trust_remote_code)
        self._inbox: queue.SimpleQueue[tuple[list[Request], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the calls in flight, shared by the feeder and the watcher
        self._running: dict[str, tuple[_Call, int]] = {}  # request id → (its call, index in the call)
        self._calls: dict[Future, _Call] = {}
        self._dead: BaseException | None = None
        self._closing = threading.Event()
        self._max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # Cumulative counters (see stats()): steps, steps with fewer sequences than the engine
        # could run, sequences summed over steps, seconds inside step(), output tokens so far.
        self._counters = {"steps": 0, "underfull_steps": 0, "seq_steps": 0, "busy_s": 0.0}
        self._tokens = 0
        self.core_processes = engine_core_processes(self.llm)
        # Their children (vLLM's executor workers) are recorded now: once a core dies they are
        # re-parented and could no longer be found from here.
        self._core_tree = self._process_tree()
        self._feeder = threading.Thread(target=self._feed, name="vllm-feeder", daemon=True)
        self._feeder.start()
        if self.core_processes:
            threading.Thread(target=self._watch, name="vllm-core-watch", daemon=True).start()

    # --- calls ------------------------------------------------------------------------------
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
        with self._lock:
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

    def progress(self, future: Future) -> Progress | None:
        with self._lock:
            call = self._calls.get(future)
            return Progress(
                steps=int(self._counters["steps"]), tokens=self._tokens, call_tokens=sum(call.tokens) if call else 0
            )

    # --- the feeder thread --------------------------------------------------------------------
    def _feed(self) -> None:
        try:
            self._feed_loop()
        except BaseException as err:  # noqa: BLE001 - the engine is gone: fail every call in flight
            # vLLM's own monitor may see a dead core first and raise EngineDeadError here, before
            # the watcher wakes: name the process that exited whichever thread notices.
            exited = self._exited_core(timeout=2.0)
            if exited:
                log.error("%s: failing the engine's calls in flight (%s)", exited, type(err).__name__)
                self.kill()
                self._fail_all(EngineFatal(exited))
                return
            log.error("vLLM engine failed: %s: %s", type(err).__name__, err)
            self._fail_all(EngineFatal(f"{type(err).__name__}: {err}"[:500]))

    def _feed_loop(self) -> None:
        """Add arriving requests, step the engine, hand back finished batches."""
        engine = self.llm.llm_engine
        while self._dead is None:
            # Block for work only when the engine has nothing to run.
            items = [self._inbox.get()] if not self._running else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for requests, future in items:
                self._add(engine, requests, future)
            if not self._running:
                continue
            t0 = time.perf_counter()
            outputs = engine.step()
            with self._lock:
                c = self._counters
                c["busy_s"] += time.perf_counter() - t0
                c["steps"] += 1
                c["seq_steps"] += min(len(self._running), self._max_seqs)
                c["underfull_steps"] += len(self._running) < self._max_seqs
                for out in outputs:
                    rid = out.request_id if out.request_id in self._running else out.request_id.rsplit("-", 1)[0]
                    if rid not in self._running:
                        continue
                    call, i = self._running[rid]
                    comp = out.outputs[0]  # type: ignore[index]  # a generation, never a pooling output
                    self._tokens += len(comp.token_ids) - call.tokens[i]
                    call.tokens[i] = len(comp.token_ids)
                    if not out.finished:
                        continue
                    del self._running[rid]
                    call.settle(
                        i,
                        Generation(
                            text=comp.text,
                            finish_reason=comp.finish_reason,
                            n_prompt_tokens=len(out.prompt_token_ids or []),
                            n_output_tokens=len(comp.token_ids),
                        ),
                    )
                    if call.future.done():
                        self._calls.pop(call.future, None)

    def _add(self, engine: Any, requests: list[Request], future: Future) -> None:
        call = _Call(future, [None] * len(requests))
        with self._lock:
            if self._dead is not None:
                call.fail(EngineFatal(f"engine is dead: {self._dead}"))
                return
            self._calls[future] = call
        for i, r in enumerate(requests):
            try:
                prompt, params = self._input(r)
                # The chat template already holds BOS and the other special tokens.
                rid = f"vecap-{uuid.uuid4().hex}"
                engine.add_request(rid, prompt, params, tokenization_kwargs={"add_special_tokens": False})
                with self._lock:
                    self._running[rid] = (call, i)  # outputs carry this (external) id
            except Exception as err:  # noqa: BLE001 - a request the engine refuses is that row's error
                if is_fatal(err):  # ... unless the engine itself is gone (EngineDeadError)
                    raise
                with self._lock:
                    call.settle(i, Generation(text=None, error=f"{type(err).__name__}: {err}"[:500]))
        with self._lock:
            if call.future.done():
                self._calls.pop(future, None)

    def _fail_all(self, err: EngineFatal) -> None:
        """The engine is gone: every call in flight and every queued call fails with ``err``."""
        with self._lock:
            if self._dead is None:
                self._dead = err
            calls = list(self._calls.values())
            self._calls.clear()
            self._running.clear()
            while True:
                try:
                    _, future = self._inbox.get_nowait()
                except queue.Empty:
                    break
                future.set_exception(err)
        for call in calls:
            call.fail(err)

    # --- the engine core's processes ------------------------------------------------------------
    def _watch(self) -> None:
        """Wait for an engine-core process to exit; unless the engine is being closed, that is fatal."""
        exited = None
        while exited is None and not self._closing.is_set():
            exited = self._exited_core(timeout=1.0)
        if self._closing.is_set() or exited is None:
            return
        log.error("%s: failing the engine's calls in flight", exited)
        self.kill()  # its executor workers would outlive it
        self._fail_all(EngineFatal(exited))

    def _exited_core(self, timeout: float) -> str | None:
        """How an engine-core process exited, if one has within ``timeout`` seconds; else None."""
        by_sentinel = {p.sentinel: p for p in self.core_processes}
        died = connection.wait(list(by_sentinel), timeout=timeout) if by_sentinel else []
        if not died:
            return None
        proc = by_sentinel[died[0]]  # type: ignore[index]  # wait() hands back the sentinels given
        proc.join(timeout=2)  # vLLM's own monitor may be reaping it at the same moment
        return describe_exit(proc.pid, proc.exitcode)

    def _process_tree(self) -> list[Any]:
        """psutil handles of the engine-core processes and their descendants (empty in-process)."""
        import psutil

        tree = []
        for p in self.core_processes:
            try:
                proc = psutil.Process(p.pid)
                tree += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
        return tree

    def kill(self) -> None:
        """SIGKILL the engine core and its workers: a stuck (or stopped) core would outlive the
        actor holding device memory, and an exited core's workers are left behind."""
        import psutil

        for proc in self._core_tree:
            try:
                if proc.is_running() and proc.pid != os.getpid():
                    proc.kill()
            except psutil.Error:
                continue

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._counters)

    def close(self) -> None:
        self._closing.set()
        del self.llm
