"""The stage contract: each step declares the work columns it reads and writes, the stream is checked
against the declarations when it is built, and the declarations are what the code reads."""

from __future__ import annotations

import dataclasses
import json
import time

import pyarrow as pa
import pytest

from vecap import vocab
from vecap.config import load_config
from vecap.layout import Layout
from vecap.stages.base import (
    ROW_COLUMNS,
    StageContractError,
    check_steps,
    read_columns,
    timed,
    timing_columns,
    work_schema,
    work_table,
)
from vecap.stages.caption import CaptionStage
from vecap.stages.fuse import FuseStage
from vecap.storage import Storage
from vecap.stream import work_steps


def _stages():
    cfg = load_config("demo")
    return CaptionStage(cfg.caption, cfg.seed), FuseStage(cfg.fuse, cfg.seed)


SCHEMA = work_schema(_stages())  # the work rows of a run of both stages


@pytest.fixture(scope="module")
def stages():
    return _stages()


def _steps(stages):
    return work_steps(
        list(stages), work_schema(stages), Storage.for_path("."), Layout(".")
    )  # built, not run: nothing is read


def test_the_stream_of_both_stages_keeps_its_declarations(stages):
    steps = _steps(stages)
    assert [s.name for s in steps] == ["caption", "caption-check", "fuse-prepare", "fuse", "fuse-check", "write-parts"]
    assert all(s.inputs for s in steps) and all(s.outputs for s in steps[:-1])
    # the part writer reads every column the stages' output tables read
    assert set(steps[-1].inputs) >= set(stages[0].reads) | set(stages[1].reads)


def test_a_wrong_declaration_fails_when_the_stream_is_built_with_the_column_named(stages):
    steps = _steps(stages)
    check = next(i for i, s in enumerate(steps) if s.name == "fuse-check")
    typo = [*steps]
    typo[check] = dataclasses.replace(steps[check], inputs=(*steps[check].inputs, "fuse_outputs"))
    with pytest.raises(StageContractError, match=r"'fuse-check' reads \['fuse_outputs'\]"):
        check_steps(typo, work_schema(stages), read_columns(stages))
    # a step before the one that writes what it reads
    early = [s for s in steps if s.name != "fuse-check"]
    early.insert(early.index(next(s for s in early if s.name == "fuse")), steps[check])
    with pytest.raises(StageContractError, match=r"'fuse-check' reads \[.*'fuse_output'"):
        check_steps(early, work_schema(stages), read_columns(stages))
    # a column that is not a work column
    bad = dataclasses.replace(steps[0], outputs=("vlm_captions",))
    with pytest.raises(StageContractError, match=r"writes \['vlm_captions'\]"):
        check_steps([bad], work_schema(stages), read_columns(stages))


def _only(rows: list[dict], reads, writes=()) -> pa.Table:
    """Work rows holding nothing but the columns a step reads, those it writes (empty) and the rows'
    bookkeeping: reading any other column fails, and what it writes outside its declaration is dropped."""
    table = work_table(rows, SCHEMA)
    for name in set(writes) - set(reads) - set(ROW_COLUMNS):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pa.nulls(table.num_rows, table.schema.field(name).type))
    return table.select(sorted(set(reads) | set(writes) | set(ROW_COLUMNS)))


def test_each_cpu_step_and_output_table_reads_only_what_it_declares(stages):
    caption, fuse = stages
    steps = {s.name: s for s in _steps(stages)}
    marker = {"shard": "00000", "is_marker": True, "report": json.dumps({"n_rows": 2})}
    base = {"shard": "00000", "source": vocab.FROM_IMAGES, "is_marker": False, "caption_source": vocab.COMPUTED}
    rows = [
        {**base, "key": "a", "status": vocab.OK, "vlm_caption": "A red bus on Tower Bridge.",
         "caption_finish_reason": "stop"},
        {**base, "key": "b", "status": vocab.OK, "vlm_caption": "  ", "caption_finish_reason": "stop"},
        marker,
    ]  # fmt: skip
    step = steps["caption-check"]
    checked = step.fn(_only(rows, step.inputs, step.outputs), **step.kwargs)
    by_key = {r["key"]: r for r in checked.to_pylist() if r["key"]}
    assert by_key["a"]["status"] == vocab.OK and by_key["b"]["status"] == vocab.CAPTION_REJECTED
    assert by_key["b"]["reason"] == "empty"  # (the demo recipe skips the checks random weights would fail)
    out = caption.output_table(_only(checked.to_pylist(), caption.reads))
    assert out.column("reason").to_pylist() == [None, "empty"]

    rows = [{**r, "alt_text": "Tower Bridge, London 1894", "caption_seed": 1} for r in checked.to_pylist()]
    step = steps["fuse-prepare"]
    prepared = step.fn(_only(rows, step.inputs, step.outputs), **step.kwargs).to_pylist()
    assert [bool(r["needs_fuse"]) for r in prepared if r["key"]] == [True, False]  # b: its caption was rejected
    for r in prepared:  # what the engine step writes, for the check
        if r.get("needs_fuse"):
            r.update(fuse_output="A red bus on Tower Bridge, London, 1894.", fuse_finish_reason="stop")
    step = steps["fuse-check"]
    fused = step.fn(_only(prepared, step.inputs, step.outputs), **step.kwargs)
    out = fuse.output_table(_only(fused.to_pylist(), fuse.reads))
    assert out.column("vec_source").to_pylist()[1] == vocab.ALT_SOURCE
    assert out.column("reason").to_pylist()[1] == vocab.NO_VLM_CAPTION


def test_the_work_schema_is_assembled_from_the_stages_in_the_run(stages):
    caption, fuse = stages
    alone = work_schema([caption]).names
    assert "pixels" in alone and "fuse_output" not in alone and "t_fuse_check" not in alone
    fused = work_schema([fuse]).names
    assert "fuse_output" in fused and "pixels" not in fused and "vlm_caption" in fused  # read from captions/
    # each step's wall and CPU seconds, named after the step: no hand-kept list of steps
    steps = ["read", *(s.name for s in caption.steps()), *(s.name for s in fuse.steps())]
    both = work_schema(stages).names
    assert [c for c in both if c.startswith("t_")] == [timing_columns(s)[0] for s in steps]
    assert "t_fuse_prepare" in both and "cpu_caption_check" in both

    class Clash(FuseStage):  # one column, two types: refused when the schema is assembled
        columns = pa.schema([("vlm_caption", pa.int64())])

    with pytest.raises(StageContractError, match=r"'vlm_caption' as int64, another stage as string"):
        work_schema([caption, Clash(load_config("demo").fuse, 0)])


def test_a_task_step_is_timed_under_its_own_name(stages):
    schema = work_schema(stages)

    def tidy(batch, pause):
        time.sleep(pause)
        return work_table(batch.to_pylist(), batch.schema)

    def read(batch):
        for _ in range(2):
            time.sleep(0.05)
            yield work_table([{"key": "a", "shard": "0"}, {"key": "b", "shard": "0"}], schema)

    rows = work_table([{"key": "a", "shard": "0"}, {"key": "b", "shard": "0"}], schema)
    out = timed(tidy, "caption-check")(rows, pause=0.1)
    assert sum(out["t_caption_check"].to_pylist()) >= 0.1 and out["t_fuse_check"].null_count == 2
    tables = list(timed(read, "read")(rows))
    assert len(tables) == 2 and all(0.05 <= sum(t["t_read"].to_pylist()) < 1.0 for t in tables)
