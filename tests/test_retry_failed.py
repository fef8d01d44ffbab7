"""`vecap fuse --retry-failed` on a copy of a whole run: only the failed keys reach the engine (the
engine actors count the requests they receive, in each shard's marker), the rest of each shard is
kept, what was built from the old rows (vecap/, the CLIP tar) is invalidated with `sizes.json`
following the tars, and retrying several stages at once is an error."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import stage_output

from vecap import cli, schemas, vocab
from vecap.config import ConfigError
from vecap.layout import STAGES
from vecap.pipeline import run

pytestmark = pytest.mark.slow
FAILED = {  # shard → (reason, error) of the rows made failed
    "00000": [
        (vocab.MODEL_ERROR, "RuntimeError: simulated"),
        (vocab.ENGINE_CRASH, "this sample made the engine process exit"),
    ],
    "00001": [(vocab.MODEL_ERROR, "APIStatusError: 500")],
}


def _committed(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in ("captions", "fused", "vecap", "clip")
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.name != "_run.json"
    }


def _fail_rows(root) -> dict[str, set[str]]:
    """Turn some fused rows whose LLM call succeeded into infrastructure fallbacks, as a failed call leaves them."""
    fused = stage_output(root, "fuse")
    chosen = {}
    for shard, errors in FAILED.items():
        rows = fused.read_table(shard).to_pylist()
        called = [r for r in rows if r["n_output_tokens"] is not None][: len(errors)]
        assert len(called) == len(errors)
        for r, (reason, error) in zip(called, errors, strict=True):
            r.update(
                vec_caption=r["vlm_caption"],
                vec_source="vlm",
                reason=reason,
                error=error,
                finish_reason=None,
                n_prompt_tokens=None,
                n_output_tokens=None,
            )
        fused.commit(shard, schemas.table(rows, schemas.FUSED), fused.read_stats(shard))
        chosen[shard] = {r["key"] for r in called}
    return chosen


def test_retry_failed_fuse_sends_only_the_failed_keys_to_the_engine(
    pipeline_root, tmp_path, demo_config, tiny_models, capsys
):
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root)
    cfg = demo_config(root)
    for steps in (["caption", "fuse"], STAGES, ["fuse", "write"]):
        with pytest.raises(ConfigError, match="one model stage at a time"):
            run(cfg, steps, retry_failed=True, progress=False)

    failed = _fail_rows(root)
    before = _committed(root)
    # `vecap fuse --retry-failed`, the CLI in this process (its exit code and summary)
    models = [f"caption.model={tiny_models['llava']}", f"fuse.model={tiny_models['llama']}"]
    capsys.readouterr()
    argv = ["fuse", "--retry-failed", "--no-progress", "--set", f"root={root}"]
    rc = cli.main([*argv, *(a for m in models for a in ("--set", m))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"fuse     → {root / 'fused'}" in out and "wall time" in out and "FAILED" not in out
    assert re.search(rf"^fuse\s+{len(FAILED)}\s+", out, re.M), out  # the summary's row: the two shards redone
    fused = stage_output(root, "fuse")
    requests = 0
    for shard, keys in failed.items():
        stats = fused.read_stats(shard)
        assert stats["retried_keys"] == len(keys)
        requests += stats.get("engine", {}).get("fuse_requests", 0)
        # every row as the original run made it: the failed ones recomputed, the others kept
        assert fused.read_table(shard).equals(stage_output(pipeline_root, "fuse").read_table(shard)), shard
        assert not stats["infra_fallbacks"]
    # The engine actors received the failed keys' requests and nothing else.
    assert requests == sum(len(k) for k in failed.values())

    # Built from the old rows: vecap/ and the tars of those shards are gone, sizes.json follows the tars.
    after = _committed(root)
    for shard in failed:
        assert not stage_output(root, "write").is_done(shard) and not (root / "clip" / f"{shard}.tar").exists()
    sizes = json.loads((root / "clip" / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in (root / "clip").glob("*.tar"))
    assert set(sizes) == {f"{s}.tar" for s in stage_output(root, "write").done()} and sizes
    untouched = {p for p in before if not any(s in p for s in failed)} - {"clip/sizes.json"}
    assert {p: after[p] for p in untouched} == {p: before[p] for p in untouched}
    assert {p for p in after if any(s in p for s in failed)} == {
        p for p in before if any(s in p for s in failed) and p.startswith(("captions/", "fused/"))
    }

    # Nothing failed any more: a second retry has nothing to do.
    again = run(cfg, ["fuse"], retry_failed=True, progress=False)
    assert again.tallies["fuse"].shards == 0 and again.tallies["fuse"].skipped_shards == len(fused.done())

    # `vecap write` rebuilds the two tars, byte for byte what the original run wrote.
    run(cfg, ["write"], progress=False)
    for shard in failed:
        assert (root / "clip" / f"{shard}.tar").read_bytes() == (pipeline_root / "clip" / f"{shard}.tar").read_bytes()
    assert json.loads((root / "clip" / "sizes.json").read_text()) == json.loads(
        (pipeline_root / "clip" / "sizes.json").read_text()
    )
