"""The whole pipeline: CLIP-ready shards read as open_clip reads them, mixing, stage-by-stage equality,
kill-and-resume with a real SIGKILL, and the cluster path through `ray job submit`."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import KillWhen, free_port, marker_path, stage_output

from vecap import vocab
from vecap.mixing import choose_txt, pick_caption
from vecap.pipeline import run
from vecap.reader import ShardReader, list_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _all_input_keys(images: Path) -> set[str]:
    return {s.key for shard in list_shards(str(images)) for s in ShardReader(str(images), shard)}


def _vecap_rows(root: Path) -> dict[str, dict]:
    out = stage_output(root, "write")
    rows = [r for s in sorted(out.done()) for r in out.read_table(s).to_pylist()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    return {r["key"]: r for r in rows}


def test_run_gives_open_clip_ready_shards_equal_to_stage_by_stage(pipeline_root, make_root, demo_config, tmp_path):
    import webdataset as wds

    root = pipeline_root  # one whole `run` of the demo recipe on the sample (session fixture; read only here)
    assert all((root / d / "_run.json").exists() for d in ("captions", "fused", "vecap"))
    rows = _vecap_rows(root)
    assert set(rows) == _all_input_keys(root / "images")
    sizes = json.loads((root / "clip" / "sizes.json").read_text())
    manifest = json.loads((root / "captions" / "_run.json").read_text())
    assert manifest["fingerprint"]["model"].endswith("tiny-llava") and manifest["versions"]["ray"]
    assert manifest["totals"]["rows"] == len(rows)
    # pandas reads every stage folder as documented: all shards, nothing else
    import pandas as pd

    for stage in ("captions", "fused", "vecap"):
        assert sorted(pd.read_parquet(root / stage).key) == sorted(rows)

    # sizes.json matches the tars, the tars hold ok samples only, with the original bytes
    inputs = {s.key: s for shard in list_shards(str(root / "images")) for s in ShardReader(str(root / "images"), shard)}
    for tar_name, count in sizes.items():
        with tarfile.open(root / "clip" / tar_name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {n.split(".", 1)[0] for n in members}
        assert len(keys) == count
        for key in keys:
            row = rows[key]
            assert row["status"] == vocab.OK and row["txt"] and row["txt_source"] in vocab.TXT_SOURCES
            image = members[f"{key}.{row['image_ext']}"]
            assert image == inputs[key].image and hashlib.sha256(image).hexdigest() == row["sha256"]
            assert members[f"{key}.txt"].decode() == row["txt"]
            meta = json.loads(members[f"{key}.json"])
            assert meta["vec_caption"] == row["vec_caption"] and meta["alt_text"] == row["alt_text"]
    assert sum(sizes.values()) == sum(1 for r in rows.values() if r["status"] == vocab.OK)
    failed = [r for r in rows.values() if r["status"] != vocab.OK]
    assert failed and all(r["txt"] is None for r in failed)  # kept in the Parquet, not in the tar
    assert rows["9900004"]["status"] == vocab.UNSUPPORTED_FORMAT  # a GIF: open_clip would not read it
    assert {r["image_ext"] for r in rows.values() if r["image_ext"]} >= {"jpg", "png", "webp"}

    # Read as open_clip's training loader does (image by jpg;png;jpeg;webp, text by txt).
    urls = [str(root / "clip" / name) for name in sorted(sizes)]
    dataset = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pilrgb")
        .rename(image="jpg;png;jpeg;webp", text="txt")
        .to_tuple("image", "text")
        .batched(4, partial=True)
    )
    seen = 0
    for images, texts in dataset:
        assert len(images) == len(texts) and all(t for t in texts)
        assert all(im.mode == "RGB" for im in images)
        seen += len(images)
    assert seen == sum(sizes.values())

    # The same files from the three stage targets, one after the other.
    staged = make_root("staged")
    for step in ("caption", "fuse", "write"):
        run(demo_config(staged), [step], progress=False)
    for stage in ("captions", "fused", "vecap"):
        for shard in list_shards(str(root / stage), ".parquet"):
            assert pq.read_table(root / stage / f"{shard}.parquet").equals(
                pq.read_table(staged / stage / f"{shard}.parquet")
            )
    for name in sizes:
        assert (root / "clip" / name).read_bytes() == (staged / "clip" / name).read_bytes()

    # A changed mix is refused for committed shards.
    from vecap.planning import ConfigMismatch

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with pytest.raises(ConfigMismatch, match="p_vec"):
        run(demo_config(copy, "write.p_vec=0.9"), ["write"], progress=False)


def test_mixing_ratio_is_near_p_reproducible_and_never_empty():
    keys = [f"{i:09d}" for i in range(600)]
    for p in (0.5, 0.2):
        picks = [choose_txt("random", p, 0, k, "alt text", "vec text") for k in keys]
        share = sum(1 for _, src in picks if src == "vec") / len(keys)
        assert abs(share - p) < 0.06
        assert picks == [choose_txt("random", p, 0, k, "alt text", "vec text") for k in keys]
    other_seed = [choose_txt("random", 0.5, 1, k, "a", "v")[1] for k in keys]
    assert other_seed != [choose_txt("random", 0.5, 0, k, "a", "v")[1] for k in keys]
    assert choose_txt("random", 1.0, 0, "k", "alt", "") == ("alt", "alt")  # the other stands in
    assert choose_txt("alt", 0.5, 0, "k", "", "vec") == ("vec", "vec")
    assert choose_txt("vec", 0.5, 0, "k", "alt", "vec") == ("vec", "vec")
    assert choose_txt("random", 0.5, 0, "k", " ", None) is None


def test_pick_caption_draws_from_the_json_per_access(tmp_path):
    import webdataset as wds

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(200):
            meta = json.dumps({"alt_text": f"alt {i}", "vec_caption": f"vec {i}", "vlm_caption": ""}).encode()
            info = tarfile.TarInfo(f"{i:05d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    stage = pick_caption({"alt_text": 0.3, "vec_caption": 0.7, "vlm_caption": 5.0}, seed=0)
    texts = [s["txt"] for s in wds.WebDataset(str(path), shardshuffle=False).decode().compose(stage)]
    assert len(texts) == 200 and all(t.startswith(("alt", "vec")) for t in texts)  # empty vlm never drawn
    assert 0.55 < sum(t.startswith("vec") for t in texts) / 200 < 0.85


def _wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {port}")


def _recipe(tmp_path: Path, root: Path, tiny_models) -> Path:
    from vecap.config import resolve_recipe

    data = yaml.safe_load(resolve_recipe("demo").read_text())
    data["root"] = str(root)
    data["caption"]["model"] = str(tiny_models["llava"])
    data["fuse"]["model"] = str(tiny_models["llama"])
    data["max_inflight_shards"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_sigkill_halfway_then_resume(make_root, tiny_models, tmp_path):
    root = make_root()
    recipe = _recipe(tmp_path, root, tiny_models)
    cmd = [sys.executable, "-m", "vecap.cli", "run", "--config", str(recipe), "--no-progress"]
    # The driver and its local Ray are SIGKILLed from outside once the first fused shard is committed.
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killer = KillWhen(proc, lambda: any((root / "fused" / "_done").glob("*.json")))
    killer.start()
    try:
        assert proc.wait(timeout=600) == -signal.SIGKILL
        killer.join()
        assert "vecap.cli run --config" in killer.cmdline
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray the driver had started
        except ProcessLookupError:
            pass
    fused, captions = stage_output(root, "fuse"), stage_output(root, "caption")
    committed = {s: marker_path(root, "fuse", s).read_bytes() for s in fused.done()}
    captioned = {s: marker_path(root, "caption", s).read_bytes() for s in captions.done()}
    n_shards = len(list_shards(str(root / "images")))
    assert 1 <= len(committed) < n_shards, "the kill should land halfway"
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {s: marker_path(root, "fuse", s).read_bytes() for s in committed} == committed  # not recomputed
    assert {s: marker_path(root, "caption", s).read_bytes() for s in captioned} == captioned
    assert set(_vecap_rows(root)) == _all_input_keys(root / "images")  # complete, each key once
    assert len(stage_output(root, "write").done()) == n_shards
    leftovers = [p for d in ("captions", "fused", "vecap", "clip") for p in (root / d).glob(".*")]
    leftovers += [p for d in ("captions", "fused", "vecap") for p in (root / d).glob("_parts/*")]
    assert not leftovers  # no temporary files or part files left
    assert not (root / "_lease.json").exists()  # the lease was released


def test_cluster_path_through_ray_job_submit(make_root, tiny_models, tmp_path):
    """A private two-node cluster (own temp dir and ports), a job submitted to it whose tasks land on
    both nodes, a driver that joins it by its GCS address (as on a node of the cluster), a Ray Client
    address refused (Ray Data does not run over Ray Client), a driver without ``RAY_ADDRESS`` that
    starts a new local Ray beside the running cluster, and only that cluster stopped."""
    root = make_root()
    recipe = _recipe(tmp_path, root, tiny_models)
    gcs, dash, client = free_port(), free_port(), free_port()
    env = _env() | {"RAY_AUTH_MODE": "disabled"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    leftover = tempfile.mkdtemp(prefix="raytmp", dir="/tmp")  # a RAY_TMPDIR holding a `ray start` address file
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--object-store-memory=400000000",
            "--disable-usage-stats",
            f"--ray-client-server-port={client}",
            f"--min-worker-port={free_port()}",
            "--max-worker-port=0",
            "--node-manager-port=0",
            "--object-manager-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=env,
        start_new_session=True,
        stdout=head_log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        _wait_for_port(gcs)
        worker = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--block",
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=6",
                '--resources={"worker_node": 1}',
                "--object-store-memory=300000000",
                "--disable-usage-stats",
                f"--min-worker-port={free_port()}",
                "--max-worker-port=0",
                "--node-manager-port=0",
                "--object-manager-port=0",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            env=env,
            start_new_session=True,
            stdout=head_log,
            stderr=subprocess.STDOUT,
        )
        submit = [
            ray_bin,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--",
            sys.executable,
            "-m",
            "vecap.cli",
            "run",
            "--config",
            str(recipe),
            "--no-progress",
        ]
        deadline = time.time() + 120
        while True:  # the dashboard takes a few seconds to come up
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if out.returncode == 0 or time.time() > deadline or "Connection" not in out.stderr + out.stdout:
                break
            time.sleep(3)
        assert out.returncode == 0, (
            out.stdout[-3000:],
            out.stderr[-3000:],
            (tmp_path / "head.log").read_text()[-3000:],
        )
        assert "succeeded" in out.stdout.lower()
        from ray.util.state import list_nodes, list_tasks

        address = f"http://127.0.0.1:{dash}"
        assert len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) == 2
        nodes = {
            t.node_id for t in list_tasks(address=address, limit=10000, raise_on_missing_output=False) if t.node_id
        }
        assert len(nodes) == 2, "the job's tasks and actors should run on both nodes"

        # Dry runs of one shard: a driver that joins the cluster, a Ray Client address, no RAY_ADDRESS
        def dry_run(shard: str, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "vecap.cli", "run", "--dry-run", "-c", str(recipe), "--no-progress"]
            return subprocess.run(
                [*cmd, "--shards", shard, *extra],
                env=env | env_extra,
                capture_output=True,
                text=True,
                timeout=600,
                cwd=REPO,
            )

        proc = dry_run("00000", RAY_ADDRESS=f"127.0.0.1:{gcs}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"the Ray cluster at 127.0.0.1:{gcs}: 8 CPUs, 0 GPUs, 2 node(s)" in proc.stderr
        assert stage_output(root / "_dry_run", "write").done() == {"00000"}
        marker = marker_path(root / "_dry_run", "write", "00000").read_bytes()
        proc = dry_run("00001", RAY_ADDRESS=f"ray://127.0.0.1:{client}")
        assert proc.returncode == 2 and "ray job submit" in proc.stderr and "Traceback" not in proc.stderr
        assert marker_path(root / "_dry_run", "write", "00000").read_bytes() == marker
        assert "00001" not in stage_output(root / "_dry_run", "caption").done()  # refused before any work
        # No RAY_ADDRESS, and the file a `ray start` without --temp-dir leaves (<RAY_TMPDIR>/ray/ray_current_cluster)
        # names the running cluster, as on a machine where one was started by hand: a new local Ray all the same.
        (Path(leftover) / "ray").mkdir()
        (Path(leftover) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{gcs}")
        proc = dry_run("00001", "--set", "ray.num_cpus=3", RAY_TMPDIR=leftover)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (Path(leftover) / "ray" / "ray_current_cluster").read_text() == f"127.0.0.1:{gcs}"
        assert "a new local Ray (3 logical CPUs): 3 CPUs, 0 GPUs, 1 node(s)" in proc.stderr
        assert len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) == 2  # the cluster untouched
    finally:
        for proc in (worker, head):
            if proc is None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(leftover, ignore_errors=True)
    assert set(_vecap_rows(root)) == _all_input_keys(root / "images")
    import ray

    assert not ray.is_initialized() or ray.cluster_resources()  # the test session's own Ray (if any) still answers


def test_dry_run_reads_every_shard_and_writes_apart(make_root, demo_config, tiny_models, capsys):
    """No models: every key gets its row with the fixed caption or its image status, under _dry_run/."""
    from vecap.backends.dry import DRY_CAPTION

    root = make_root("dry")
    result = run(demo_config(root), progress=False, dry_run=True)
    dry = root / "_dry_run"
    assert not (root / "captions").exists() and not (root / "clip").exists()  # real outputs untouched
    captions = stage_output(dry, "caption")
    keys = _all_input_keys(root / "images")
    rows = [r for s in sorted(captions.done()) for r in captions.read_table(s).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(keys)
    assert {r["vlm_caption"] for r in rows if r["status"] == vocab.OK} == {DRY_CAPTION}
    assert any(r["status"] == vocab.IMAGE_UNDECODABLE for r in rows)  # broken images found
    stats = captions.read_stats(sorted(captions.done())[0])
    assert stats["timings"]["t_read"] > 0 and stats["fingerprint"]["model"]
    assert result.tallies["write"].shards == len(captions.done())
    assert json.loads((dry / "captions" / "_run.json").read_text())["dry_run"] is True
    assert (dry / "clip" / "sizes.json").exists()

    # `vecap plan --dry-run-root`: the plan's CPU cost per sample is the dry run's, over all its rows
    from vecap.cli import main
    from vecap.plan import cpu_cost_from_dry_run

    capsys.readouterr()
    models = [f"caption.model={tiny_models['llava']}", f"fuse.model={tiny_models['llama']}"]
    argv = ["plan", "-c", "demo", *(a for m in models for a in ("--set", m)), "--images", "1000000"]
    argv += ["--gpu", "h100", "--dry-run-root", str(root), "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    steps, n = cpu_cost_from_dry_run(str(root))
    assert n == len(keys) and sum(steps.values()) > 0
    assert plan["cpu_s_per_sample"] == pytest.approx(sum(steps.values()))
    assert plan["cpu_steps"] == pytest.approx(steps) and str(root) in plan["cpu_source"]


def test_a_missing_or_empty_root_is_an_error(tmp_path, demo_config, monkeypatch):
    from vecap.config import ConfigError

    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere" / "images")):
        run(demo_config(tmp_path / "nowhere"), progress=False)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no input shards"):
        run(demo_config(tmp_path / "empty"), progress=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match="relative"):
        run(demo_config("relative/root"), progress=False)
    with pytest.raises(ConfigError, match="caption.cache 'relative/cache' is relative"):
        run(demo_config(tmp_path / "empty", "caption.cache=relative/cache"), progress=False)
