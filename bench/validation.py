"""Precision and recall of vecap's output validators on the labelled set, per category.

    python -m bench.validation [--cases tests/data/validation_cases.yaml] [--misses]

A category is a rejection reason, or ``accept``. Precision: of the outputs given that verdict,
the share that deserved it; recall: of the outputs that deserve it, the share that got it.
Uses only vecap's public functions (``vecap.validation.check_fused`` / ``check_caption``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import yaml

from vecap.validation import CAPTION_REASONS, FUSE_REASONS, check_caption, check_fused

DEFAULT_CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "validation_cases.yaml"


def judge(data: dict, stage: str) -> list[tuple[dict, str, str]]:
    """(case, expected, got) for every case of a stage; a good output tidied otherwise than labelled is a miss."""
    out = []
    for case in data.get(stage, []):
        finish = case.get("finish_reason", "stop")
        if stage == "fuse":
            v = check_fused(case["output"], finish, case["alt_text"], case["vlm_caption"], data.get("instructions", ""))
        else:
            v = check_caption(case["output"], finish, instructions=data.get("caption_instructions", ""))
        got = v.reason or "accept"
        if got == "accept" and "tidied" in case and v.text != case["tidied"]:
            got = "accept (tidied otherwise)"
        out.append((case, case["expect"], got))
    return out


def table(results: list[tuple[dict, str, str]], order: tuple[str, ...]) -> list[str]:
    expected = Counter(e for _, e, _ in results)
    predicted = Counter(g for _, _, g in results)
    right = Counter(e for _, e, g in results if e == g)
    lines = [f"{'category':<16} {'cases':>5} {'given':>5} {'right':>5} {'precision':>9} {'recall':>7}"]
    for cat in ("accept", *order, *sorted(set(predicted) - {"accept", *order})):
        if not expected[cat] and not predicted[cat]:
            continue
        p = f"{right[cat] / predicted[cat]:.0%}" if predicted[cat] else "-"
        r = f"{right[cat] / expected[cat]:.0%}" if expected[cat] else "-"
        lines.append(f"{cat:<16} {expected[cat]:>5} {predicted[cat]:>5} {right[cat]:>5} {p:>9} {r:>7}")
    return lines


def overall(results: list[tuple[dict, str, str]]) -> str:
    bad = [(e, g) for _, e, g in results if e != "accept"]
    good = [(e, g) for _, e, g in results if e == "accept"]
    rejected = sum(1 for _, g in bad if not g.startswith("accept"))
    right = sum(1 for e, g in bad if e == g)
    accepted = sum(1 for _, g in good if g == "accept")
    pct = lambda a, b: f"{a}/{b} ({a / b:.1%})" if b else "-"  # noqa: E731
    return (
        f"bad rejected: {pct(rejected, len(bad))}; with the right reason: {pct(right, len(bad))}; "
        f"good accepted (and tidied as labelled): {pct(accepted, len(good))}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="labelled YAML (default: %(default)s)")
    ap.add_argument("--misses", action="store_true", help="list every case judged otherwise than labelled")
    args = ap.parse_args(argv)
    data = yaml.safe_load(args.cases.read_text())
    for stage, order in (("fuse", FUSE_REASONS), ("caption", CAPTION_REASONS)):
        t0 = time.perf_counter()
        results = judge(data, stage)
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(results))
        print(f"\n== {stage} stage: {len(results)} labelled outputs ({ms:.2f} ms each)")
        print("\n".join(table(results, order)))
        print(overall(results))
        if args.misses:
            for case, e, g in results:
                if e != g:
                    print(f"  miss {case['id']}: expected {e}, got {g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
