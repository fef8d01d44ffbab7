"""Alt-text / VeC mixing: at write time (stateless, per key) and at load time (per access).

VeCLIP found that training on a mix of alt-text and VeC captions beats either alone.
The write stage fixes one choice per sample in ``<key>.txt`` (what open_clip reads),
decided by a hash of the run seed and the key: reproducible, no state, any order.
For load-time mixing (a new draw every epoch, as LaCLIP and VeCLIP trained),
:func:`pick_caption` is a webdataset stage that draws from the sample's ``.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

MODES = ("random", "vec", "alt", "both")


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key)."""
    digest = hashlib.sha256(f"mix:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_txt(
    mode: str, p_vec: float, seed: int, key: str, alt: str | None, vec: str | None
) -> tuple[str, str] | None:
    """(text, source) for ``<key>.txt``; the other caption stands in when the chosen one is empty.

    Returns None when neither caption has text (the sample cannot be trained on).
    """
    alt, vec = (alt or "").strip(), (vec or "").strip()
    if mode == "alt":
        want_vec = False
    elif mode in ("vec", "both"):
        want_vec = True
    elif mode == "random":
        want_vec = unit_hash(seed, key) < p_vec
    else:
        raise ValueError(f"unknown mix mode {mode!r}; choose one of {MODES}")
    order = [(vec, "vec"), (alt, "alt")] if want_vec else [(alt, "alt"), (vec, "vec")]
    for text, source in order:
        if text:
            return text, source
    return None


def pick_caption(probs: dict[str, float] | None = None, seed: int | None = None, json_key: str = "json"):
    """A webdataset pipeline stage: set ``sample["txt"]`` to a caption drawn from the ``.json``.

    ``probs`` maps caption fields of the vecap ``.json`` (``alt_text``, ``vec_caption``,
    ``vlm_caption``) to probabilities; fields that are empty for a sample are skipped.

        dataset = wds.WebDataset(urls).decode("pil").compose(pick_caption({"alt_text": .5, "vec_caption": .5}))
    """
    probs = dict(probs or {"alt_text": 0.5, "vec_caption": 0.5})
    fields, weights = list(probs), list(probs.values())
    rng = random.Random(seed)

    def stage(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            raw = sample.get(json_key)
            meta: dict[str, Any] = (json.loads(raw) if isinstance(raw, (bytes, str)) else raw) or {}
            options = [(f, w) for f, w in zip(fields, weights, strict=True) if (meta.get(f) or "").strip()]
            if options:
                names, ws = zip(*options, strict=True)
                sample["txt"] = meta[rng.choices(names, weights=ws)[0]].strip()
            yield sample

    return stage
