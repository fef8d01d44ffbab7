"""Precision and recall of vecap's output validators on the labelled set, per category and part.

    python -m bench.validation [--cases tests/data/validation_cases.yaml] [--misses] [--part dev|heldout]

The labelled set has two parts: ``dev`` (cases without ``split``, written alongside the rules) and
``heldout`` (``split: heldout``, written before the rules of issue 23 and never edited since). A
category is a rejection reason, or ``accept``. Precision: of the outputs given that verdict, the
share that deserved it; recall: of the outputs that deserve it, the share that got it. The CPU
time per row is the validator's alone (``time.process_time`` over every case of the stage, a few
passes, caches cleared between them). Uses only vecap's public functions (``check_fused`` /
``check_caption``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from vecap.config import CaptionChecks
from vecap.validation import CAPTION_REASONS, FUSE_REASONS, check_caption, check_fused

DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "validation_cases.yaml"
PARTS = ("dev", "heldout")


def part_of(case: dict) -> str:
    return case.get("split", "dev")


def caption_checks(case: dict) -> CaptionChecks | None:
    """The recipe's checks for a caption case: its ``language`` is the language the captions were asked in."""
    lang = case.get("language")
    if lang is None:
        return None
    if "language" not in CaptionChecks.model_fields:  # a validator without the setting judges every case in the default
        return None
    return CaptionChecks(language=lang)


def verdict(data: dict, stage: str, case: dict) -> Any:
    finish = case.get("finish_reason", "stop")
    if stage == "fuse":
        return check_fused(case["output"], finish, case["alt_text"], case["vlm_caption"], data.get("instructions", ""))
    return check_caption(
        case["output"], finish, caption_checks(case), instructions=data.get("caption_instructions", "")
    )


def judge(data: dict, stage: str, part: str | None = None) -> list[tuple[dict, str, str]]:
    """(case, expected, got) for every case of a stage (of one part); a good output tidied otherwise than
    labelled is a miss."""
    out = []
    for case in data.get(stage, []):
        if part is not None and part_of(case) != part:
            continue
        v = verdict(data, stage, case)
        got = v.reason or "accept"
        if got == "accept" and "tidied" in case and v.text != case["tidied"]:
            got = "accept (tidied otherwise)"
        out.append((case, case["expect"], got))
    return out


def cpu_ms_per_row(data: dict, stage: str, passes: int = 3) -> float:
    """CPU milliseconds per row of the stage's validation, caches of analysed texts cleared before each pass."""
    cases = data.get(stage, [])
    best = float("inf")
    for _ in range(passes):
        _clear_caches()
        t0 = time.process_time()
        for case in cases:
            verdict(data, stage, case)
        best = min(best, (time.process_time() - t0) * 1000 / max(1, len(cases)))
    return best


def _clear_caches() -> None:
    import vecap.validation as v

    for mod in [v, *(getattr(v, name) for name in ("text", "measures", "tidy", "checks") if hasattr(v, name))]:
        for obj in vars(mod).values():
            # analysed texts are cleared; objects built once per process (the language identifier) stay
            if hasattr(obj, "cache_clear") and (obj.cache_info().maxsize or 2) > 1:
                obj.cache_clear()


def table(results: list[tuple[dict, str, str]], order: tuple[str, ...]) -> list[str]:
    expected = Counter(e for _, e, _ in results)
    predicted = Counter(g for _, _, g in results)
    right = Counter(e for _, e, g in results if e == g)
    lines = [f"{'category':<26} {'cases':>5} {'given':>5} {'right':>5} {'precision':>9} {'recall':>7}"]
    for cat in ("accept", *order, *sorted((set(expected) | set(predicted)) - {"accept", *order})):
        if not expected[cat] and not predicted[cat]:
            continue
        p = f"{right[cat] / predicted[cat]:.0%}" if predicted[cat] else "-"
        r = f"{right[cat] / expected[cat]:.0%}" if expected[cat] else "-"
        lines.append(f"{cat:<26} {expected[cat]:>5} {predicted[cat]:>5} {right[cat]:>5} {p:>9} {r:>7}")
    return lines


def overall(results: list[tuple[dict, str, str]]) -> str:
    bad = [(e, g) for _, e, g in results if e != "accept"]
    good = [(e, g) for _, e, g in results if e == "accept"]
    rejected = sum(1 for _, g in bad if not g.startswith("accept"))
    right = sum(1 for e, g in bad if e == g)
    kept = sum(1 for _, g in good if g.startswith("accept"))
    accepted = sum(1 for _, g in good if g == "accept")
    pct = lambda a, b: f"{a}/{b} ({a / b:.1%})" if b else "-"  # noqa: E731
    return (
        f"bad rejected: {pct(rejected, len(bad))}; with the right reason: {pct(right, len(bad))}; "
        f"good kept: {pct(kept, len(good))}; and tidied as labelled: {pct(accepted, len(good))}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="labelled YAML (default: %(default)s)")
    ap.add_argument("--misses", action="store_true", help="list every case judged otherwise than labelled")
    ap.add_argument("--part", choices=PARTS, help="only this part (default: both, each on its own)")
    args = ap.parse_args(argv)
    data = yaml.safe_load(args.cases.read_text())
    for stage, order in (("fuse", FUSE_REASONS), ("caption", CAPTION_REASONS)):
        ms = cpu_ms_per_row(data, stage)
        print(f"\n===== {stage} stage: validation {ms:.3f} CPU ms per row (target <= 1 ms)")
        for part in (args.part,) if args.part else PARTS:
            results = judge(data, stage, part)
            if not results:
                continue
            print(f"\n-- {stage} / {part}: {len(results)} labelled outputs")
            print("\n".join(table(results, order)))
            print(overall(results))
            if args.misses:
                for case, e, g in results:
                    if e != g:
                        print(f"  miss {case['id']}: expected {e}, got {g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
