"""The vLLM engine as it runs on a GPU: its engine core in a child process of the engine's owner.

One real engine (tiny Llama, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``) for the whole module, driven
through vecap's backend as the engine actors drive it: its process tree, vLLM's statistics,
the progress the hung-call watchdog reads (still while the core is stopped, moving again when it
is continued) and a SIGKILL of the core mid-call failing the call in flight and every later one.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from vecap.backends import EngineSpec, Request, Sampling, load_engine
from vecap.backends.base import EngineFatal

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Describe a harbour at dawn."}]


@pytest.fixture(scope="module")
def engine(tiny_models):
    import vllm.envs

    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    # An in-process engine started earlier in this test process froze vLLM's reading of its
    # environment (vllm.envs.enable_envs_cache): read it afresh, or the core would stay in-process.
    vllm.envs.disable_envs_cache()
    spec = EngineSpec(
        backend="vllm",
        model=str(tiny_models["llama"]),
        dtype="float32",
        # every request runs to its length (EOS ignored): calls last long enough to be caught mid-way
        sampling=Sampling(max_new_tokens=400, synthetic_lengths=(400, 400)),
        engine_kwargs={"enforce_eager": True, "max_model_len": 512},
    )
    engine = load_engine(spec)
    yield engine
    engine.kill()
    if saved is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


def _requests(n: int) -> list[Request]:
    return [Request(messages=MESSAGES, seed=i, key=f"k{i}") for i in range(n)]


def _wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.05)


def test_the_engine_core_is_a_child_process_and_statistics_reach_its_owner(engine):
    (core,) = engine.core_processes
    proc = psutil.Process(core.pid)
    assert proc.name() == "VLLM::EngineCore" and proc.ppid() == os.getpid()
    out = engine.submit(_requests(2)).result(timeout=120)
    assert [g.n_output_tokens for g in out] == [400, 400] and all(g.error is None for g in out)
    names = {m.name for m in engine.llm.get_metrics()}  # what vecap.metrics exports through Ray
    assert {"vllm:num_requests_running", "vllm:generation_tokens"} <= names


def test_progress_stops_while_the_engine_core_is_stopped_and_moves_when_continued(engine):
    (core,) = engine.core_processes
    future = engine.submit(_requests(32))
    _wait_until(lambda: engine.progress(future).call_tokens > 0)
    os.kill(core.pid, signal.SIGSTOP)
    try:
        time.sleep(0.5)  # outputs already on their way
        stopped = engine.progress(future)
        time.sleep(2.0)
        again = engine.progress(future)
        assert (again.steps, again.tokens) == (stopped.steps, stopped.tokens) and not future.done()
    finally:
        os.kill(core.pid, signal.SIGCONT)
    _wait_until(lambda: engine.progress(future).tokens > again.tokens)
    assert len(future.result(timeout=120)) == 32


def test_a_sigkill_of_the_engine_core_fails_the_call_in_flight_and_every_later_call(engine):
    (core,) = engine.core_processes
    tree = [psutil.Process(core.pid), *psutil.Process(core.pid).children(recursive=True)]
    future = engine.submit(_requests(32))
    _wait_until(lambda: engine.progress(future).call_tokens > 0)
    assert psutil.Process(core.pid).name() == "VLLM::EngineCore"
    os.kill(core.pid, signal.SIGKILL)
    # no watchdog here: only the death of the process can end the call
    with pytest.raises(EngineFatal, match=rf"engine core process {core.pid} exited with signal 9"):
        future.result(timeout=120)
    with pytest.raises(EngineFatal, match="engine is dead"):
        engine.submit(_requests(1)).result(timeout=5)
    # the core's own workers are killed with it, not left behind
    _wait_until(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in tree), timeout=30)
