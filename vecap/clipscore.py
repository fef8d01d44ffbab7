"""Optional CLIPScore: how well each text of a row matches its image, by a CLIP model.

Off by default; the write stage scores a row's alt-text, VLM caption and VeC caption when the
recipe names a CLIP model (``write.clip_model``: a local folder or a hub id of a transformers
``CLIPModel`` with its ``CLIPProcessor``; remote code is never run). The score is
``100 * max(cos(image, text), 0)``: the CLIPScore of Hessel et al. (2021) with w = 1 and scaled
by 100, as torchmetrics' ``CLIPScore`` reports it (multiply by 0.025 for the paper's w = 2.5
scale, 0…2.5). Texts are truncated by the tokenizer to the model's text positions (77 for
OpenAI's CLIP).

The model is loaded once per worker process and device (module-level cache) and every heavy
import is lazy, so importing this module costs nothing when no model is configured.
"""

from __future__ import annotations

import threading
from typing import Any

_MODELS: dict[tuple[str, str], ClipScorer] = {}
_LOCK = threading.Lock()


def get_scorer(model: str, device: str = "cpu") -> ClipScorer:
    """The process's scorer for ``(model, device)``, loaded on first use."""
    key = (str(model), device)
    with _LOCK:
        scorer = _MODELS.get(key)
        if scorer is None:
            scorer = _MODELS[key] = ClipScorer(str(model), device)
        return scorer


class ClipScorer:
    """A transformers CLIP model and processor; :meth:`scores` rates texts against images."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32) -> None:
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as err:  # pragma: no cover - both are dependencies of the hf backend
            raise ImportError("write.clip_model needs torch and transformers (pip install 'vecap[hf]')") from err
        self.torch = torch
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.processor = CLIPProcessor.from_pretrained(model, trust_remote_code=False)
        # (transformers types the decorated Module.to as taking the model first)
        self.model = CLIPModel.from_pretrained(model, trust_remote_code=False).to(device).eval()  # type: ignore[arg-type]
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        crop = getattr(self.processor.image_processor, "crop_size", None) or {}
        size = getattr(self.processor.image_processor, "size", None) or {}
        # The side the processor resizes to: images are decoded no larger than this on the short side.
        self.image_size = int(
            max(crop.get("height", 0), crop.get("width", 0), size.get("shortest_edge", 0))
            or self.model.config.vision_config.image_size
        )

    def _features(self, out: Any) -> Any:
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor.
        feats = out if self.torch.is_tensor(out) else out.pooler_output
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _image_embeds(self, images: list[Any]) -> Any:
        chunks = []
        for i in range(0, len(images), self.batch_size):
            pix = self.processor.image_processor(images=images[i : i + self.batch_size], return_tensors="pt")
            chunks.append(
                self._features(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device)))
            )
        return self.torch.cat(chunks)

    def _text_embeds(self, texts: list[str]) -> Any:
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.processor.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            chunks.append(self._features(self.model.get_text_features(**enc)))
        return self.torch.cat(chunks)

    def scores(self, images: list[Any], texts: dict[str, list[str | None]]) -> dict[str, list[float | None]]:
        """For each name in ``texts`` (one text per image), ``100 * max(cos, 0)`` per image.

        None where the image is None or the text is None or blank. Images are PIL images (RGB).
        """
        n = len(images)
        for name, column in texts.items():
            if len(column) != n:
                raise ValueError(f"texts[{name!r}] has {len(column)} entries for {n} images")
        out: dict[str, list[float | None]] = {name: [None] * n for name in texts}
        have = [i for i, im in enumerate(images) if im is not None]
        pairs = [
            (name, i, text)
            for name, column in texts.items()
            for i in have
            if isinstance(text := column[i], str) and text.strip()
        ]
        if not pairs:
            return out
        with self.torch.inference_mode():
            used = sorted({i for _, i, _ in pairs})
            img = self._image_embeds([images[i].convert("RGB") for i in used])
            row_of = {i: r for r, i in enumerate(used)}
            txt = self._text_embeds([text for _, _, text in pairs])
            idx = self.torch.tensor([row_of[i] for _, i, _ in pairs], device=img.device)
            cos = (img[idx] * txt).sum(-1).float().clamp_min(0).mul(100).cpu().tolist()
        for (name, i, _), value in zip(pairs, cos, strict=True):
            out[name][i] = float(value)
        return out


def scores(
    images: list[Any], texts: dict[str, list[str | None]], model: str, device: str = "cpu", batch_size: int = 32
) -> dict[str, list[float | None]]:
    """:meth:`ClipScorer.scores` with the process's cached scorer for ``model``."""
    scorer = get_scorer(model, device)
    scorer.batch_size = max(1, int(batch_size))
    return scorer.scores(images, texts)
