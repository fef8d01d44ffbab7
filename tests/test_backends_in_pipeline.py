"""The `hf` and `openai` backends inside real pipeline runs (Ray actors, part files, markers), and
the OpenAI backend's failure paths.

- `hf` for both model stages gives the same rows and statuses as the `vllm` run of the same shards;
- `openai` for the fuse stage, against a real `vllm` OpenAI-compatible server on loopback serving the
  tiny Llama, gives the same rows, statuses and LLM calls as the `vllm` run;
- failure paths: no `base_url` (a clear error), a 4xx reply (a prompt over the server's context:
  that row alone is `model_error`), a reply without `usage` (tokens unknown, nothing else lost),
  and an unreachable server (fatal: the actor restarts, the circuit breaker stops the run, non-zero).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import free_port, jpeg_bytes, sample_members, stage_output, write_img2dataset_parquet, write_tar

from vecap import schemas, vocab
from vecap.layout import STAGES
from vecap.pipeline import RunFailed, run

pytestmark = pytest.mark.slow
SHARDS = ["00000", "00099"]


def _rows(root, step, shard) -> dict[str, dict]:
    return {r["key"]: r for r in stage_output(root, step).read_table(shard).to_pylist()}


# --- hf ----------------------------------------------------------------------------------------
def test_hf_backend_in_a_pipeline_run_matches_vllm(make_root, demo_config, pipeline_root):
    root = make_root("hf")
    cfg = demo_config(
        root,
        "caption.backend=hf",
        "fuse.backend=hf",
        "caption.engine={}",
        "fuse.engine={}",
        "caption.batch_size=8",
        "fuse.batch_size=8",
    )
    result = run(cfg, shards=SHARDS, progress=False)
    assert not result.failed
    for step in STAGES:
        assert stage_output(root, step).done() == set(SHARDS)
        for shard in SHARDS:
            hf, ref = _rows(root, step, shard), _rows(pipeline_root, step, shard)
            assert sorted(hf) == sorted(ref), (step, shard)
            assert {k: r["status"] for k, r in hf.items()} == {k: r["status"] for k, r in ref.items()}, (step, shard)
    for shard in SHARDS:
        captions = _rows(root, "caption", shard)
        assert all(r["model"] == cfg.caption.model for r in captions.values())
        ok = [r for r in captions.values() if r["status"] == vocab.OK]
        assert ok and all(r["vlm_caption"] and r["n_output_tokens"] > 0 for r in ok)  # hf really generated
        fused, ref = _rows(root, "fuse", shard), _rows(pipeline_root, "fuse", shard)
        # the same rows reached the LLM (the rest settled without it, the same way)
        assert {k for k, r in fused.items() if r["n_output_tokens"] is not None} == {
            k for k, r in ref.items() if r["n_output_tokens"] is not None
        }
        assert (root / "clip" / f"{shard}.tar").exists() or not any(
            r["status"] == vocab.OK for r in _rows(root, "write", shard).values()
        )


# --- openai against a real vLLM server ------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_server(tiny_models, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` with the tiny Llama on a free loopback port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_models["llama"]),
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
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()


def _openai(base_url: str, *more: str) -> list[str]:
    return [
        "fuse.backend=openai",
        f"fuse.base_url={base_url}",
        "fuse.model=tiny-llama",
        "fuse.engine={}",
        "fuse.request_concurrency=4",
        *more,
    ]


def test_openai_backend_in_a_pipeline_run_matches_vllm(llm_server, pipeline_root, tmp_path, demo_config):
    """Fuse (and write) through the server, over the vLLM run's own captions."""
    root = tmp_path / "root"
    shutil.copytree(pipeline_root / "images", root / "images")
    shutil.copytree(pipeline_root / "captions", root / "captions")
    result = run(demo_config(root, *_openai(llm_server)), ["fuse", "write"], progress=False)
    assert not result.failed
    shards = sorted(stage_output(pipeline_root, "fuse").done())
    assert stage_output(root, "fuse").done() == stage_output(root, "write").done() == set(shards)
    for shard in shards:
        fused, ref = _rows(root, "fuse", shard), _rows(pipeline_root, "fuse", shard)
        assert sorted(fused) == sorted(ref)
        assert {k: r["status"] for k, r in fused.items()} == {k: r["status"] for k, r in ref.items()}
        called = {k for k, r in fused.items() if r["n_output_tokens"] is not None}
        assert called == {k for k, r in ref.items() if r["n_output_tokens"] is not None}
        assert all(fused[k]["n_prompt_tokens"] > 0 and fused[k]["finish_reason"] in ("stop", "length") for k in called)
        assert all(r["model"] == "tiny-llama" for r in fused.values())
        assert not stage_output(root, "fuse").read_stats(shard).get("infra_fallbacks")  # no request failed
        written, ref_w = _rows(root, "write", shard), _rows(pipeline_root, "write", shard)
        assert {k: r["status"] for k, r in written.items()} == {k: r["status"] for k, r in ref_w.items()}


# --- a hand-made root whose captions are committed: the fuse stage alone, no VLM --------------------
ALT = "Nike Air Max 90 in Paris"
VLM = "white shoes on a street"
FUSED = "White Nike Air Max 90 shoes on a street in Paris."


def _fuse_root(root: Path, demo_config, alts: dict[str, str]) -> Path:
    """images/00000 with one key per alt-text, and captions/00000 committed by hand (all ok)."""
    members, rows, captions = [], [], []
    for i, (key, alt) in enumerate(sorted(alts.items())):
        members += sample_members(key, jpeg_bytes(color=(30 * i, 60, 90)), alt=alt)
        rows.append({"key": key, "caption": alt})
        captions.append(
            {"key": key, "shard": "00000", "status": vocab.OK, "vlm_caption": VLM, "seed": i, "finish_reason": "stop"}
        )
    write_tar(root / "images" / "00000.tar", members)
    write_img2dataset_parquet(root / "images" / "00000.parquet", rows)
    from vecap.pipeline import build_stages

    fp = build_stages(demo_config(root), ["caption"])["caption"].fingerprint()
    stage_output(root, "caption").commit(
        "00000", schemas.table(captions, schemas.CAPTIONS), {"n_rows": len(captions), "fingerprint": fp}
    )
    return root


def test_openai_4xx_for_one_prompt_is_that_row_model_error(llm_server, tmp_path, demo_config):
    """A prompt longer than the server's context (2048 tokens) is refused with a 400: that row alone
    falls back (model_error, counted as an infrastructure fallback); the others are fused."""
    alts = {"0000000": ALT, "0000001": " ".join(["Paris"] * 3000), "0000002": ALT}
    root = _fuse_root(tmp_path / "root", demo_config, alts)
    cfg = demo_config(root, *_openai(llm_server, "fuse.max_alt_text_words=5000"))
    run(cfg, ["fuse"], progress=False)
    rows = _rows(root, "fuse", "00000")
    bad = rows["0000001"]
    assert bad["status"] == vocab.OK and bad["vec_source"] == "vlm" and bad["vec_caption"] == VLM
    assert bad["reason"] == vocab.MODEL_ERROR and ("400" in bad["error"] or "BadRequest" in bad["error"]), bad["error"]
    for key in ("0000000", "0000002"):
        assert rows[key]["n_output_tokens"] > 0 and rows[key]["reason"] != vocab.MODEL_ERROR, rows[key]
    stats = stage_output(root, "fuse").read_stats("00000")
    assert stats["infra_fallbacks"] == {"model_error": 1}


class _NoUsage(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every chat completion without `usage`."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _NoUsage.requests.append(body)
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": FUSED}, "finish_reason": "stop"}],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_reply_without_usage(tmp_path, demo_config):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _NoUsage.requests.clear()
    try:
        alts = {f"000000{i}": ALT for i in range(4)}
        root = _fuse_root(tmp_path / "root", demo_config, alts)
        base = f"http://127.0.0.1:{server.server_address[1]}/v1"
        result = run(demo_config(root, *_openai(base)), ["fuse"], progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert len(_NoUsage.requests) == 4 and {r["model"] for r in _NoUsage.requests} == {"tiny-llama"}
    rows = _rows(root, "fuse", "00000")
    for r in rows.values():
        assert r["status"] == vocab.OK and r["vec_source"] == "fused" and r["vec_caption"] == FUSED, r
        assert r["n_prompt_tokens"] is None and r["n_output_tokens"] is None and r["finish_reason"] == "stop"
    stats = stage_output(root, "fuse").read_stats("00000")
    assert stats["statuses"] == {"ok": 4} and stats["prompt_tokens"] == stats["output_tokens"] == 0
    assert not stats["fallbacks"] and result.tallies["fuse"].rows == 4


def test_openai_without_base_url_is_a_clear_error(tmp_path, demo_config):
    from vecap.config import ConfigError

    root = _fuse_root(tmp_path / "root", demo_config, {"0000000": ALT})
    with pytest.raises(ConfigError, match="needs base_url"):
        demo_config(root, "fuse.backend=openai", "fuse.model=tiny-llama", "fuse.engine={}")
    assert not stage_output(root, "fuse").done()


@pytest.mark.timeout(600)
def test_openai_unreachable_server_stops_the_run(tmp_path, demo_config):
    """Nothing listens: every call fails to connect, a fatal engine error. The actor exits, Ray restarts
    it, and after faults.max_consecutive_fatal such errors the run stops, non-zero, saying why;
    no shard is committed with quiet fallbacks."""
    root = _fuse_root(tmp_path / "root", demo_config, {f"000000{i}": ALT for i in range(3)})
    base = f"http://127.0.0.1:{free_port()}/v1"
    cfg = demo_config(
        root, *_openai(base, "fuse.request_timeout_s=2", "fuse.request_retries=0"), "faults.max_consecutive_fatal=2"
    )
    with pytest.raises(RunFailed) as err:
        run(cfg, ["fuse"], progress=False)
    assert "00000" in err.value.failed and "fatal" in err.value.failed["00000"], err.value.failed
    assert not stage_output(root, "fuse").done()
