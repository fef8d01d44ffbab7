"""An ``s3://`` root against a real S3 endpoint on loopback (moto's server mode), with s3fs as the client:
same rows and tar members as a local run, pandas reads a stage from the bucket, a caption cache in the bucket, a real
SIGKILL of the driver then a resume loses and duplicates nothing, and a second run on the same root is refused."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import MOTO_WHY, KillWhen, import_or_skip

from vecap.layout import Layout
from vecap.outputs import StageOutput
from vecap.pipeline import build_stages, run
from vecap.reuse import resolve
from vecap.storage import Storage

pytestmark = pytest.mark.slow
SHARDS = ["00000", "00099"]  # a shard of the sample and the shard of bad images


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; yields the s3fs storage options that reach it."""
    moto_server = import_or_skip("moto.server", MOTO_WHY)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port  # noqa: SLF001 - moto exposes the bound port only here
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    yield options
    server.stop()


def _bucket_root(s3, sample_images, name: str) -> str:
    storage = Storage.for_path("s3://vecap-test", s3)
    if not storage.fs.exists("vecap-test"):
        storage.fs.mkdir("vecap-test")
    root = f"s3://vecap-test/{name}"
    storage.fs.put(str(sample_images) + "/", f"{root}/images/", recursive=True)
    return root


def _tar_members(storage: Storage, path: str) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(path))) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None, f"{path}: {m.name} is not a file"
            out[m.name] = f.read()
    return out


def test_s3_root_gives_the_same_rows_and_tars_as_a_local_root(
    s3, sample_images, make_root, demo_config, tiny_models, tmp_path
):
    import pandas as pd

    local = make_root("local")
    run(demo_config(local), shards=SHARDS, progress=False)
    root = _bucket_root(s3, sample_images, "same")
    cfg = demo_config(root, "caption.cache=s3://vecap-test/caption-cache")
    cfg.storage_options = s3  # the cache's too (caption.cache_storage_options unset)
    result = run(cfg, shards=SHARDS, progress=False)
    assert result.tallies["write"].shards == len(SHARDS)
    storage = Storage.for_path(root, s3)
    remote, here = Layout(root), Layout(str(local))
    for step in ("caption", "fuse", "write"):
        assert StageOutput(remote, step, storage).done() == set(SHARDS)
        for shard in SHARDS:
            a = StageOutput(remote, step, storage).read_table(shard)
            b = StageOutput(here, step, Storage.for_path(str(local))).read_table(shard)
            assert a.equals(b), (step, shard)
    for shard in SHARDS:
        assert _tar_members(storage, remote.tar(shard)) == _tar_members(Storage.for_path(str(local)), here.tar(shard))
    assert json.loads(storage.read_bytes(remote.sizes)) == json.loads(Path(here.sizes).read_text())
    # pandas reads a stage straight from the bucket, as the README says
    fused = pd.read_parquet(f"{root}/fused", storage_options=s3)
    assert len(fused) == sum(StageOutput(here, "fuse").read_stats(s)["n_rows"] for s in SHARDS)
    assert not storage.exists(remote.lease)  # released
    assert not storage.names(remote.join("fused", "_parts"))  # no part left behind

    # The caption cache in the bucket holds the computed captions, and a resolution job finds them all.
    cache = build_stages(cfg, ["caption"])["caption"].cache
    captions = pd.read_parquet(f"{root}/captions", storage_options=s3)
    cached = captions[captions.status.isin(["ok", "caption_rejected"]) & captions.sha256.notna()]
    assert cache.files() and sum(storage.read_table(f).num_rows for f in cache.files()) == len(cached)
    found = resolve(SHARDS, remote.images, storage, f"{root}/reuse-check", dedup=True, cache=cache)
    assert found.n_cache == len(cached) > 0

    # The report and inspect read the bucket through the recipe's storage_options (a custom endpoint)
    recipe = _recipe(tmp_path, root, s3, tiny_models)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def vecap(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vecap.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )

    proc = vecap("report", "-c", str(recipe), "--samples", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from test_report import assert_no_live_markup, decodes

    assert f"{root}/report.html" in proc.stdout
    page = assert_no_live_markup(storage.read_bytes(f"{root}/report.html").decode())
    assert len(page.cards) == 6 and all(page.cards.values())  # the samples' thumbnails, from the bucket's tars
    assert all(decodes(src) for srcs in page.cards.values() for src in srcs)
    proc = vecap("inspect", f"{root}/vecap", "-c", str(recipe))
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_rows = sum(StageOutput(remote, "write", storage).read_stats(s)["n_rows"] for s in SHARDS)
    assert f"rows (markers): {n_rows}" in proc.stdout and f"{len(SHARDS)} done shard(s)" in proc.stdout


def _recipe(tmp_path: Path, root: str, s3: dict, tiny_models) -> Path:
    from vecap.config import resolve_recipe

    data = yaml.safe_load(resolve_recipe("demo").read_text())
    data.update(root=root, storage_options=s3, max_inflight_shards=1)
    data["caption"]["model"] = str(tiny_models["llava"])
    data["fuse"]["model"] = str(tiny_models["llama"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigkill_and_resume_on_s3_and_one_run_per_root(s3, sample_images, tiny_models, tmp_path):
    root = _bucket_root(s3, sample_images, "killed")
    storage = Storage.for_path(root, s3)
    layout = Layout(root)
    recipe = _recipe(tmp_path, root, s3, tiny_models)
    cmd = [sys.executable, "-m", "vecap.cli", "run", "--config", str(recipe), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    # killed from outside (the driver and its local Ray) once its first fused shard is committed
    killer = KillWhen(first, lambda: bool(StageOutput(layout, "fuse", storage).done()), poll_s=0.05)
    killer.start()
    try:
        deadline = time.time() + 120
        while not storage.exists(layout.lease) and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        held = json.loads(storage.read_bytes(layout.lease))
        # A second run on the same root, while the first one holds it: refused, naming the first.
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert held["run_id"] in second.stderr and "One run per root" in second.stderr
        assert first.wait(timeout=600) == -signal.SIGKILL, first.stderr.read()[-3000:]
        killer.join()
        assert "vecap.cli run --config" in killer.cmdline
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the local Ray the killed driver had started
        except ProcessLookupError:
            pass
    fused = StageOutput(layout, "fuse", storage)
    n_shards = len([n for n in storage.names(layout.images) if n.endswith(".tar")])
    committed = {s: storage.read_bytes(layout.marker("fuse", s)) for s in fused.done()}
    assert 1 <= len(committed) < n_shards, "the kill should land halfway"
    # The killed driver's lease is still there; its process is gone, so the resume takes it over.
    assert storage.exists(layout.lease)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Its workers' logs are in the bucket (Ray ends workers without their exit handlers: the driver
    # collects each node's staged files at the end), and nothing of them is left staged on this machine.
    from vecap.runlog import staging_dir

    run_id = re.search(r"run (\d{8}-\d{6}-[0-9a-f]{6}) on", done.stderr)[1]
    logs = layout.logs(run_id)
    workers = {n: storage.read_bytes(f"{logs}/{n}").decode() for n in storage.names(logs) if n.startswith("worker-")}
    assert any("fuse engine (vllm) loaded" in t for t in workers.values()), sorted(workers)
    assert "driver.log" in storage.names(logs)
    assert not os.path.exists(staging_dir(logs))
    assert {s: storage.read_bytes(layout.marker("fuse", s)) for s in committed} == committed  # kept, not redone
    keys = [
        k
        for s in sorted(StageOutput(layout, "write", storage).done())
        for k in StageOutput(layout, "write", storage).read_table(s)["key"].to_pylist()
    ]
    expected = [
        k
        for s in storage.names(layout.images)
        if s.endswith(".parquet")
        for k in storage.read_table(f"{layout.images}/{s}")["key"].to_pylist()
    ]
    assert len(keys) == len(set(keys)) and set(expected) <= set(keys)  # nothing lost, nothing twice
    sizes = json.loads(storage.read_bytes(layout.sizes))
    assert set(sizes) == {n for n in storage.names(layout.clip) if n.endswith(".tar")}
