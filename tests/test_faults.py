"""Engine and storage faults, with real processes: recovered, or failed loudly; never silent fallbacks.

The engine faults run in the shape users run on a GPU: vLLM's engine core in a child process of
the engine actor (``VLLM_ENABLE_V1_MULTIPROCESSING=1``). Each kill first checks that it hits the
process it means (by name and command line), and each test then checks that the fault took
effect (restarts counted in the markers, shards in flight redone) and that the output equals a
clean run's.

- SIGKILL of the caption actor's engine core mid-run, with the watchdog's limit out of reach:
  found by the backend in seconds, the actor restarts; SIGSTOP of the fuse actor's engine core:
  the watchdog (no engine progress) restarts it. No engine process outlives the run.
- SIGKILL of the fuse actor's own process mid-run; an input that makes the caption engine core
  die every time it reaches it: only that key is ``engine_crash`` (calls holding keys of a
  crashed call run alone, so other batches in flight are not blamed).
- A flaky storage layer (OSError on a share of reads and writes): the same output as a clean run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import stage_output

from vecap import vocab
from vecap.backends.base import ChatEngine, EngineFatal, Generation, is_fatal
from vecap.faults import FaultRegistry, plan_groups
from vecap.pipeline import run

SHARDS = ["00000", "00099"]


# --- the pieces, alone ------------------------------------------------------------------------
def test_plan_groups_bisects_keys_that_crashed_twice():
    keys = [f"k{i}" for i in range(8)]
    assert plan_groups(keys, {}) == ([], [keys])
    once = {k: (1, False) for k in keys}
    assert plan_groups(keys, once) == ([], [keys])  # one crash may be anything: retry as is
    twice = {k: (2, False) for k in keys}
    assert plan_groups(keys, twice) == ([], [keys[:4], keys[4:]])
    mixed = {"k1": (3, False), "k2": (3, False), "k5": (2, True)}
    assert plan_groups(keys, mixed) == (["k5"], [["k0", "k3", "k4", "k6", "k7"], ["k1"], ["k2"]])
    once_alone = {"k5": (1, True)}  # one crash of a call of one sample: not yet blamed on it
    assert plan_groups(keys, once_alone) == ([], [keys])
    # the first half crashed again, the second never ran: the next split narrows to the first
    first_half_again = {**{k: (3, False) for k in keys[:4]}, **{k: (2, False) for k in keys[4:]}}
    assert plan_groups(keys, first_half_again) == ([], [keys[4:], keys[:2], keys[2:4]])


def _bisect(poison: str, outside_kill_alone: bool = False) -> tuple[FaultRegistry, int, bool]:
    """Replay the retries of one batch of 8 keys whose ``poison`` kills the engine, through the
    registry and plan_groups as the engine actors use them. ``outside_kill_alone``: the engine also
    dies of something else (a device error, a kill) during the first call of an innocent sample alone.
    Returns the registry, the attempts it took and whether that outside kill happened."""
    reg, keys = FaultRegistry(max_consecutive_fatal=99), [f"k{i}" for i in range(8)]
    reg.end(["other"])  # the engine works for other batches
    killed_outside = False
    for attempt in range(1, 20):  # noqa: B007 (the count is read after the loop)
        counts = reg.counts(keys)
        crashed, groups = plan_groups(keys, counts)
        reg.isolate(crashed)
        keys = [k for k in keys if k not in crashed]
        for group in groups:
            reg.begin(group, alone=any(k in counts for k in group))  # a suspect call runs alone
            if poison in group:
                break  # the engine process dies: the call never ends
            if outside_kill_alone and len(group) == 1 and not killed_outside:
                killed_outside = True
                break  # the engine dies of something else: this call never ends either
            reg.end(group)
        else:
            break
    return reg, attempt, killed_outside


def test_bisection_isolates_a_poison_key_wherever_it_is_in_the_batch():
    for poison in range(8):
        reg, attempt, _ = _bisect(f"k{poison}")
        assert reg.isolated == [f"k{poison}"] and attempt <= 7, (poison, attempt)


def test_an_engine_death_during_an_innocent_samples_call_alone_isolates_only_the_poison():
    # The faulted run's race, replayed: the engine is killed from outside during the first call of an
    # innocent suspect alone; that sample must not become engine_crash.
    reg, _, killed_outside = _bisect("k4", outside_kill_alone=True)
    assert killed_outside, "no innocent sample was ever called alone: the scenario did not happen"
    assert reg.isolated == ["k4"]


def test_a_batch_of_one_sample_in_flight_beside_the_poison_is_not_blamed():
    # The faulted run's race, replayed: batches [k3] and [k4] (their other rows need no engine) are in
    # flight together on one actor when k4 kills the engine; on the restarted actor both are suspects and
    # run alone, and the engine is killed from outside during k3's call. k3 crashed twice in calls of one
    # sample, but only once alone: it must not become engine_crash.
    reg, batches, poison = FaultRegistry(max_consecutive_fatal=99), [["k3"], ["k4"]], "k4"
    killed_outside = False
    for attempt in range(10):  # noqa: B007
        reg.end([f"other{attempt}"])  # the other batches of the stage go on working
        counts = reg.counts([k for b in batches for k in b])
        plans = [plan_groups(b, counts) for b in batches]
        for crashed, _ in plans:
            reg.isolate(crashed)
        calls = [g for _, groups in plans for g in groups]
        shared = [g for g in calls if not any(k in counts for k in g)]
        alone = [g for g in calls if any(k in counts for k in g)]
        for g in shared:  # in flight together: one death ends them all
            reg.begin(g)
        if any(poison in g for g in shared):
            continue
        for g in shared:
            reg.end(g)
        for g in sorted(alone):  # the gate runs them one after the other; k3 first
            reg.begin(g, alone=True)
            if poison in g or not killed_outside:
                killed_outside = True  # the first call alone is k3's: the outside kill
                break
            reg.end(g)
        else:
            break
    assert killed_outside, "the outside kill never happened: the scenario did not run"
    assert reg.isolated == ["k4"] and attempt < 9


def test_registry_counts_open_calls_and_trips_the_breaker():
    reg = FaultRegistry(max_consecutive_fatal=3)
    reg.begin(["a", "b"])
    assert reg.counts(["a", "b", "c"]) == {"a": (1, False), "b": (1, False)}
    reg.end(["a", "b"])
    assert reg.counts(["a"]) == {}
    reg.begin(["a"], alone=True)
    assert reg.counts(["a"]) == {"a": (1, False)}  # alone, but nothing has worked since: not blamed
    reg.end(["z"])  # the engine works for another sample
    assert reg.counts(["a"]) == {"a": (1, False)}  # one call alone that never ended: not yet blamed
    reg.begin(["a"])
    assert reg.counts(["a"]) == {"a": (2, False)}  # a call of one sample beside others is not a call alone
    reg.begin(["a"], alone=True)
    assert reg.counts(["a"]) == {"a": (3, True)}  # twice alone, and the engine works for others: a poison
    assert reg.fatal("x") is None and reg.fatal("x") is None
    reg.end(["z"])  # a success resets the count
    assert reg.fatal("x") is None
    reg.isolate(["a"])  # isolating a sample is not a success of the engine
    assert reg.fatal("y") is None
    assert "3 fatal engine errors in a row" in reg.fatal("boom")


def test_the_circuit_breaker_exits_non_zero_and_keeps_what_was_committed(
    make_root, tiny_models, ray_local, capsys, caplog
):
    """`vecap caption` commits shard 00000; a second `vecap caption` of 00000–00001 meets a dead device on
    every call of 00001's: the engine actor exits, Ray restarts it, the second fatal error in a row trips
    the breaker; the command exits 1 saying so, 00000 stays as it was committed (marker and rows, byte for
    byte), 00001 is reported failed and not committed. (The engine is vecap.demo.faulty's model-less one:
    the breaker's plumbing; the unreachable-server test trips it with a real backend.)"""
    import json

    from helpers import marker_path

    from vecap import cli
    from vecap.layout import Layout
    from vecap.reader import ShardReader

    root = make_root()
    dead = sorted(r.key for r in ShardReader(str(root / "images"), "00001"))
    sets = [
        f"root={root}",
        f"caption.model={tiny_models['llava']}",
        "caption.backend=vecap.demo.faulty:DeadDeviceEngine",
        f"caption.env={json.dumps({'VECAP_DEAD_KEYS': ','.join(dead)})}",
        "faults.max_consecutive_fatal=2",
    ]
    argv = ["caption", "--no-progress", *(a for x in sets for a in ("--set", x)), "--shards", "00000"]
    assert cli.main(argv) == 0
    out = stage_output(root, "caption")
    parquet = Path(Layout(str(root)).parquet("caption", "00000"))
    committed = {p: p.read_bytes() for p in (parquet, marker_path(root, "caption", "00000"))}
    capsys.readouterr()
    with caplog.at_level("ERROR"):
        rc = cli.main([*argv, "00001"])
    assert rc == 1
    assert "2 fatal engine errors in a row" in caplog.text and "committed shards are kept" in caplog.text
    assert "00001" in caplog.text and "DeadDeviceEngine" in caplog.text
    assert out.done() == {"00000"} and {p: p.read_bytes() for p in committed} == committed
    # the first fatal error made the actor exit and Ray restart it: the second came from the new actor
    assert json.loads(Path(Layout(str(root)).run_file("caption")).read_text())["engine_restarts"] >= 1


def test_a_suspect_call_waits_for_the_calls_in_flight_and_runs_alone():
    import asyncio

    from vecap.faults import SuspectGate

    async def scenario() -> list[str]:
        gate, events = SuspectGate(), []

        async def call(name: str, suspect: bool, start: float) -> None:
            await asyncio.sleep(start)
            async with gate.call(suspect):
                events.append(f"+{name}")
                await asyncio.sleep(0.05)
                events.append(f"-{name}")

        await asyncio.gather(call("a", False, 0), call("b", False, 0.01), call("s", True, 0.02), call("c", False, 0.03))
        return events

    events = asyncio.run(scenario())
    # a and b overlap; the suspect s starts after both ended and ends before c (which came after it) starts
    assert events.index("+b") < events.index("-a")
    assert events.index("+s") > max(events.index("-a"), events.index("-b"))
    assert events.index("+c") == events.index("-s") + 1


def test_an_engine_actor_works_on_at_most_its_batches_in_flight():
    # Ray Data runs several batches of one task at once in an async UDF (4 in Ray 2.60), whatever the
    # actor's task limit: the actor keeps max_batches_in_flight itself (poison isolation relies on it).
    import asyncio
    import json

    from helpers import ConcurrencyEngine

    from vecap.backends import EngineSpec
    from vecap.config import load_config
    from vecap.stages.base import work_schema, work_table
    from vecap.stages.fuse import FuseStage, FuseWorker

    schema = work_schema([FuseStage(load_config("demo").fuse, 0)])

    def batch(i: int):
        rows = [
            {"key": f"{i}{j}", "shard": "00000", "needs_fuse": True, "fuse_seed": j, "fuse_messages": json.dumps([])}
            for j in range(2)
        ]
        return work_table(rows, schema)

    for limit in (1, 3):
        ConcurrencyEngine.most = 0
        worker = FuseWorker(EngineSpec(backend="helpers:ConcurrencyEngine", model="m"), batches_in_flight=limit)

        async def all_at_once(worker=worker):
            return await asyncio.gather(*(worker(batch(i)) for i in range(8)))

        out = asyncio.run(all_at_once())
        assert ConcurrencyEngine.most == limit
        assert [t.num_rows for t in out] == [2] * 8
        assert all(o == "a red bus" for t in out for o in t.column("fuse_output").to_pylist())


class _Scripted(ChatEngine):
    """Fails the requests whose text says so; counts engine calls."""

    def __init__(self, error: Exception) -> None:
        from vecap.backends import EngineSpec

        super().__init__(EngineSpec(backend="scripted", model="scripted"))
        self.error, self.calls = error, 0

    def _generate(self, requests):
        self.calls += 1
        if any("bad" in r.messages for r in requests):
            raise self.error
        return [Generation(text="ok", finish_reason="stop") for _ in requests]


def test_a_bad_request_is_isolated_by_bisection_and_a_dead_engine_is_fatal():
    from vecap.backends import Request

    requests = [Request(messages=["bad" if i == 5 else "good"], seed=i) for i in range(16)]
    engine = _Scripted(ValueError("prompt too long"))
    out = engine.generate(requests)
    assert [g.error is not None for g in out] == [i == 5 for i in range(16)]
    assert engine.calls <= 2 * 4 + 1  # log2(16) levels, not 16 calls
    dead = _Scripted(type("EngineDeadError", (RuntimeError,), {})("engine core died"))
    with pytest.raises(EngineFatal):
        dead.generate(requests)
    assert is_fatal(ConnectionError("refused")) and not is_fatal(ValueError("bad prompt"))


# --- real faults, with the engine core in its own process as on a GPU ---------------------------
MULTIPROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"
CORE = "VLLM::EngineCore"
CAPTION_ACTOR, FUSE_ACTOR = "MapBatches(CaptionWorker)", "MapBatches(FuseWorker)"


def _actors(worker: str, busy: bool = False) -> list[psutil.Process]:
    """This test's engine actor processes of one stage (``MapBatches(CaptionWorker)`` in the command
    line); ``busy``: only those running a batch (Ray titles the process with the method it runs)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if worker in title and (not busy or f"{worker}).submit" in title):
            out.append(p)
    return out


def _cores(worker: str, busy: bool = True) -> list[psutil.Process]:
    """The vLLM engine-core children (by process name) of a stage's engine actors running a batch."""
    out = []
    for actor in _actors(worker, busy):
        try:
            out += [c for c in actor.children() if c.name() == CORE]
        except psutil.Error:
            continue
    return out


def _vllm_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["name", "status"]):
        if (p.info["name"] or "").startswith("VLLM::") and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.add(p.pid)
    return out


class _Fault(threading.Thread):
    """In the background: send ``sig`` to the first process ``find()`` returns (once ``after``, another
    fault, has happened), after checking by its name and command line that it is the one meant.
    Records what it hit and which shards of ``stage_dir`` were not committed yet."""

    def __init__(self, root, find, sig: int, stage_dir: str, expect: str, after: _Fault | None = None) -> None:
        super().__init__(daemon=True)
        self.root, self.find, self.sig, self.stage_dir, self.expect, self.after = (
            root,
            find,
            sig,
            stage_dir,
            expect,
            after,
        )
        self.deadline = time.time() + 500
        self.hit: dict = {}
        self.start()

    def run(self) -> None:
        while time.time() < self.deadline:
            procs = self.find() if self.after is None or self.after.hit else []
            if procs:
                proc = procs[0]
                who = f"{proc.name()} {' '.join(proc.cmdline())} (parent: {' '.join(proc.parent().cmdline())})"
                committed = {p.stem for p in (self.root / self.stage_dir / "_done").glob("*.json")}
                if self.expect in who:  # the process we mean, not a neighbour
                    proc.send_signal(self.sig)
                    self.hit = {"pid": proc.pid, "parent": proc.ppid(), "who": who, "pending": set(SHARDS) - committed}
                return
            time.sleep(0.05)


def _rows(root, step: str, without: str | None = None) -> list[dict]:
    rows = [r for s in SHARDS for r in stage_output(root, step).read_table(s).to_pylist()]
    # params_sha256 names the backend, which the poison wrapper changes
    return [{k: v for k, v in r.items() if k != "params_sha256"} for r in rows if r["key"] != without]


def _same_as(reference, root, steps=("caption",), shards=SHARDS) -> None:
    for step in steps:
        for shard in shards:
            a, b = stage_output(root, step).read_table(shard), stage_output(reference, step).read_table(shard)
            assert a.equals(b), (step, shard)


@pytest.fixture(scope="module")
def faulted_run(sample_images, tiny_models, ray_local, tmp_path_factory):
    """One run of caption and fuse, both engine cores in their own processes, with four faults:

    - the caption actor's engine core SIGKILLed during its first batch; the caption stage's
      watchdog limit (``call_timeout_s``) is far beyond this test's time limit, so only the
      detection of the process's death can rescue its calls;
    - one caption input (``victim``) that SIGKILLs the caption engine core whenever it reaches it
      (vecap.demo.faulty): isolated as ``engine_crash``;
    - the fuse actor's engine core SIGSTOPped during its first batch: alive, no progress; the
      watchdog (10 s without engine progress) restarts the actor;
    - then the restarted fuse actor's own process SIGKILLed during a batch.
    """
    import json

    from vecap.config import load_config
    from vecap.reader import ShardReader

    root = tmp_path_factory.mktemp("faulted") / "root"
    shutil.copytree(sample_images, root / "images")
    keys = sorted(r.key for r in ShardReader(str(root / "images"), "00000"))
    victim = keys[len(keys) // 2]
    before, logs_before = _vllm_processes(), _worker_log_sizes()
    dead = _Fault(root, lambda: _cores(CAPTION_ACTOR), signal.SIGKILL, "captions", f"{CORE} ")
    hung = _Fault(root, lambda: _cores(FUSE_ACTOR), signal.SIGSTOP, "fused", f"{CORE} ")
    actor = _Fault(
        root,
        lambda: [p for p in _actors(FUSE_ACTOR, busy=True) if p.pid != hung.hit["parent"]],
        signal.SIGKILL,
        "fused",
        f"{FUSE_ACTOR}).submit",
        after=hung,
    )
    mp = {MULTIPROCESS: "1"}
    cfg = load_config(
        "demo",
        [
            f"root={root}",
            f"caption.model={tiny_models['llava']}",
            f"fuse.model={tiny_models['llama']}",
            f"caption.env={json.dumps({**mp, 'VECAP_POISON_KEYS': victim})}",
            f"fuse.env={json.dumps(mp)}",
            "caption.backend=vecap.demo.faulty:PoisonVLLMEngine",
            "caption.call_timeout_s=100000",
            "fuse.call_timeout_s=10",
            "caption.batch_size=2",
            "fuse.batch_size=2",
            "caption.max_batches_in_flight=1",
            "fuse.max_batches_in_flight=1",
        ],
    )
    try:
        result = run(cfg, ["caption", "fuse"], shards=SHARDS, progress=False)
    finally:
        if hung.hit:
            with contextlib.suppress(psutil.Error):
                psutil.Process(hung.hit["pid"]).kill()  # never leave a stopped process behind
    for fault in (dead, hung, actor):
        fault.join(timeout=5)
    # Orphaned engine processes (of the SIGKILLed actor) are ended by Ray's reaper and vLLM's own
    # parent watch, which take their time on a loaded machine.
    deadline = time.time() + 90
    while _vllm_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    return {
        "root": root,
        "result": result,
        "victim": victim,
        "dead": dead.hit,
        "hung": hung.hit,
        "actor": actor.hit,
        "left": {pid: _command_line(pid) for pid in _vllm_processes() - before},
        "worker_logs": _worker_logs(logs_before),
    }


def _worker_log_sizes() -> dict[Path, int]:
    """The session's Ray worker stderr files (the engine actors' log lines) and their sizes now."""
    import ray

    node = ray._private.worker._global_node
    assert node is not None, "no Ray in this process"
    logs = Path(node.get_logs_dir_path())
    return {p: p.stat().st_size for p in sorted(logs.glob("worker-*.err"))}


def _worker_logs(since: dict[Path, int]) -> str:
    """What the session's Ray workers wrote to stderr after ``since`` (from :func:`_worker_log_sizes`)."""
    out = []
    for path in _worker_log_sizes():
        with open(path, "rb") as f:
            f.seek(since.get(path, 0))
            out.append(f.read().decode(errors="replace"))
    return "\n".join(out)


def _command_line(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"{proc.name()} (parent {proc.ppid()}: {' '.join(psutil.Process(proc.ppid()).cmdline())[:120]})"
    except psutil.Error:
        return "gone"


@pytest.mark.timeout(900)
def test_a_sigkilled_engine_core_is_found_without_the_watchdog(faulted_run):
    hit = faulted_run["dead"]
    assert hit, "the caption actor's engine core was never killed"
    assert hit["who"].startswith(CORE) and f"(parent: ray::MapWorker({CAPTION_ACTOR})" in hit["who"]
    assert hit["pending"], "the kill came after the stage had committed everything"
    # the backend saw that process die (not the watchdog: its limit here is 100,000 s)
    assert f"engine core process {hit['pid']} exited with signal 9 (SIGKILL)" in faulted_run["worker_logs"]
    # the actor was restarted (engines started in a restarted actor), its batch redone, the run complete
    assert faulted_run["result"].engine_restarts.get("caption", 0) >= 1
    assert not faulted_run["result"].failed and set(stage_output(faulted_run["root"], "caption").done()) == set(SHARDS)


def test_a_stopped_engine_core_is_restarted_by_the_watchdog(faulted_run):
    hit = faulted_run["hung"]
    assert hit and hit["who"].startswith(CORE) and f"(parent: ray::MapWorker({FUSE_ACTOR})" in hit["who"]
    assert hit["pending"]
    assert (
        "engine call hung: waited" in faulted_run["worker_logs"]
        and "(limit call_timeout_s=10)" in faulted_run["worker_logs"]
    )
    assert faulted_run["result"].engine_restarts.get("fuse", 0) >= 1


def test_an_engine_actor_killed_mid_batch_is_restarted(faulted_run):
    hit = faulted_run["actor"]
    assert hit and f"ray::MapWorker({FUSE_ACTOR}).submit" in hit["who"].split(" (parent")[0] and hit["pending"]
    assert faulted_run["result"].engine_restarts.get("fuse", 0) >= 2  # after the watchdog's, this one


def test_an_input_that_kills_the_engine_core_is_isolated(faulted_run):
    root, victim = faulted_run["root"], faulted_run["victim"]
    rows = {r["key"]: r for r in _rows(root, "caption")}
    assert rows[victim]["status"] == vocab.ENGINE_CRASH and rows[victim]["reason"] == vocab.ENGINE_CRASH
    # the poison killed the engine at least twice alone before it was isolated, each a restart
    kills = faulted_run["worker_logs"].count(f"poison input ['{victim}']: SIGKILL of engine process")
    assert kills >= 2 and faulted_run["result"].engine_restarts.get("caption", 0) >= kills
    others = [r for k, r in rows.items() if k != victim and r["status"] not in vocab.IMAGE_FAILURES]
    assert others and all(r["status"] in (vocab.OK, vocab.CAPTION_REJECTED) for r in others)


def test_the_faulted_run_equals_a_clean_run(faulted_run, pipeline_root):
    root, victim = faulted_run["root"], faulted_run["victim"]
    for step in ("caption", "fuse"):
        got, clean = _rows(root, step, without=victim), _rows(pipeline_root, step, without=victim)
        assert [r["key"] for r in got] == [r["key"] for r in clean], step
        for a, b in zip(got, clean, strict=True):
            assert a == b, (step, a["key"], {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)})
    assert not faulted_run["result"].tallies["fuse"].fallbacks.get("model_error")


def test_the_faulted_run_leaves_no_engine_process(faulted_run):
    assert not faulted_run["left"], f"engine processes outlived the run: {faulted_run['left']}"


def test_flaky_storage_gives_the_same_output_as_a_clean_run(sample_images, tmp_path, demo_config, pipeline_root):
    from vecap.demo.flaky import register

    register()
    root = tmp_path / "flaky"
    shutil.copytree(sample_images, root / "images")
    cfg = demo_config(f"flaky://{root}")
    cfg.storage_options = {"fail_rate": 0.02, "seed": 7}
    result = run(cfg, shards=SHARDS, progress=False)
    assert not result.failed
    _same_as(pipeline_root, root, steps=("caption", "fuse", "write"))
    for shard in SHARDS:
        assert (root / "clip" / f"{shard}.tar").read_bytes() == (pipeline_root / "clip" / f"{shard}.tar").read_bytes()


# --- a server that goes away, a node that goes away ----------------------------------------------
def _start_server(model, port: int, log_path) -> subprocess.Popen:
    import sys
    import urllib.request

    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--served-model-name",
        "tiny-llama",
    ]
    log = open(log_path, "a")
    server = subprocess.Popen(
        cmd,
        env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        assert server.poll() is None, open(log_path).read()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    raise TimeoutError("the OpenAI-compatible server did not start")


def _stop(server) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def test_openai_server_killed_and_restarted_mid_run_loses_no_caption(pipeline_root, tiny_models, tmp_path, demo_config):
    """The fuse stage's server dies mid-run and comes back: requests are retried with back-off
    (or the actor restarts); no row becomes model_error and nothing falls back because of it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    shutil.copytree(pipeline_root / "images", root / "images")
    shutil.copytree(pipeline_root / "captions", root / "captions")
    server = _start_server(tiny_models["llama"], port, tmp_path / "server.log")
    restarted: list = []
    committed_at_kill: list[set[str]] = []

    def chaos() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not list(root.glob("fused/_parts/*/*.parquet")):
            time.sleep(0.2)
        _stop(server)  # mid-run: some shards fused, others not
        committed_at_kill.append(stage_output(root, "fuse").done())
        time.sleep(3)
        restarted.append(_start_server(tiny_models["llama"], port, tmp_path / "restarted.log"))

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        cfg = demo_config(
            root,
            "fuse.backend=openai",
            f"fuse.base_url=http://127.0.0.1:{port}/v1",
            "fuse.model=tiny-llama",
            "fuse.engine={}",
            "fuse.batch_size=4",
            "fuse.request_concurrency=2",
        )
        result = run(cfg, ["fuse"], progress=False)
        thread.join(timeout=300)
    finally:
        _stop(server)
        for s in restarted:
            _stop(s)
    assert restarted, "the server was never restarted"
    assert not result.failed
    # The kill came before the stage was done, and the restarted server answered the rest: the requests
    # that met the dead server were sent again (the client's retries, or a restarted actor's).
    done = stage_output(root, "fuse").done()
    assert committed_at_kill and committed_at_kill[0] < done, (committed_at_kill, done)
    served = (tmp_path / "restarted.log").read_text().count('POST /v1/chat/completions HTTP/1.1" 200')
    assert served > 0, (tmp_path / "restarted.log").read_text()[-2000:]
    rows = [
        r
        for s in sorted(stage_output(root, "fuse").done())
        for r in stage_output(root, "fuse").read_table(s).to_pylist()
    ]
    assert len(rows) == sum(
        stage_output(pipeline_root, "fuse").read_stats(s)["n_rows"] for s in stage_output(root, "fuse").done()
    )
    assert not [r for r in rows if r["reason"] in vocab.RETRYABLE]
    assert not sum(result.tallies["fuse"].fallbacks.get(k, 0) for k in ("model_error", "engine_crash"))


def test_a_finalize_task_rerun_after_its_commit_returns_that_commit(pipeline_root, tmp_path, demo_config):
    """Ray reruns a finalize task whose node died after it had committed a stage and removed
    the stage's parts: the rerun returns that commit instead of failing on missing parts."""
    from dataclasses import replace

    from vecap.finalize import ShardJob, finalize_shard
    from vecap.outputs import StageOutput
    from vecap.pipeline import build_stages, layout_of
    from vecap.storage import Storage

    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    cfg = demo_config(root)
    layout, storage = layout_of(cfg), Storage.for_path(str(root))
    out = StageOutput(layout, "caption", storage)
    table = out.read_table("00000")
    out.invalidate("00000")
    storage.write_table(f"{layout.parts('caption', '00000')}/part.parquet", table)
    job = ShardJob(
        "00000", [build_stages(cfg, ["caption"])["caption"]], report={"n_rows": table.num_rows}, run_id="run-a"
    )
    first = finalize_shard(storage, layout, job)
    assert not storage.names(layout.parts("caption", "00000")) and out.read_table("00000").equals(table)
    assert finalize_shard(storage, layout, job) == first  # the rerun of the same task
    with pytest.raises(RuntimeError, match="0 caption rows assembled"):  # another run's commit is not taken for ours
        finalize_shard(storage, layout, replace(job, run_id="run-b"))


def test_a_worker_node_stopped_mid_run_leaves_every_key_exactly_once(sample_images, tiny_models, tmp_path):
    """A two-node cluster on this machine (ray.cluster_utils); the worker node is removed (its
    processes killed) while the run is in progress: the job still completes, each key once."""
    import json
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "root"
    shutil.copytree(sample_images, root / "images")
    script = textwrap.dedent(
        f"""
        import json, threading, time
        from pathlib import Path
        import ray
        from ray.cluster_utils import Cluster
        from vecap.config import load_config
        from vecap.pipeline import run

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 4, "object_store_memory": 250_000_000}})
        worker = cluster.add_node(num_cpus=6, object_store_memory=250_000_000)
        ray.init(address=cluster.address, log_to_driver=False)
        root = Path({str(root)!r})
        cfg = load_config("demo", [f"root={{root}}", "caption.model={tiny_models["llava"]}",
                                   "fuse.model={tiny_models["llama"]}",
                                   "caption.cpus_per_actor=1", "fuse.cpus_per_actor=1", "caption.batch_size=4",
                                   "fuse.batch_size=4", "max_inflight_shards=2"])
        removed, seen_on_worker = [], set()

        def busy_on_worker():
            # Ray names a worker process after what it runs (ray::MapBatches(CaptionWorker), ...)
            import psutil
            raylet = psutil.Process(worker.all_processes["raylet"][0].process.pid)
            for p in raylet.children(recursive=True):
                try:
                    title = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if title.startswith("ray::") and not title.startswith("ray::IDLE"):
                    seen_on_worker.add(title.split()[0])

        def chaos():
            deadline = time.time() + 300
            while time.time() < deadline and not (list(root.glob("captions/_done/*.json")) and seen_on_worker):
                busy_on_worker()
                time.sleep(0.2)
            cluster.remove_node(worker)
            removed.append(len(list(root.glob("captions/_done/*.json"))))

        threading.Thread(target=chaos, daemon=True).start()
        result = run(cfg, progress=False)
        print("RESULT " + json.dumps({{"removed_after": removed, "failed": result.failed,
                                      "seen": sorted(seen_on_worker), "nodes": len(ray.nodes())}}), flush=True)
        ray.shutdown()
        cluster.shutdown()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["removed_after"], "the worker node was never removed"
    assert out["seen"], "no work ran on the worker node before it was removed"
    assert not out["failed"]
    from vecap.reader import ShardReader, list_shards

    images = str(root / "images")
    expected = {s.key for shard in list_shards(images) for s in ShardReader(images, shard)}
    keys = [
        k
        for s in sorted(stage_output(root, "write").done())
        for k in stage_output(root, "write").read_table(s)["key"].to_pylist()
    ]
    assert len(keys) == len(set(keys)) and set(keys) == expected
