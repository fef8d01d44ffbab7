"""Any OpenAI-compatible chat endpoint (e.g. ``vllm serve``), many requests in flight.

The server owns batching; this client keeps ``request_concurrency`` requests open
so that it always has work. Images travel as PNG data URLs (lossless, already small).
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vecap.backends.base import ChatEngine, EngineSpec, Generation, Request, is_fatal


def _image_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(messages: list[dict[str, Any]], image) -> list[dict[str, Any]]:
    """Our messages (HF-style ``{"type": "image"}`` parts) → OpenAI's ``image_url`` parts."""
    converted = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _image_url(image)}})
                else:
                    parts.append(p)
            content = parts
        converted.append({"role": m["role"], "content": content})
    return converted


class OpenAIEngine(ChatEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        from openai import OpenAI

        if not spec.base_url:
            raise ValueError("the openai backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.client = OpenAI(
            base_url=spec.base_url,
            api_key=os.environ.get(spec.api_key_env, "EMPTY"),
            timeout=spec.request_timeout_s,
            max_retries=spec.request_retries,
        )
        if not spec.model:
            self.model = self.client.models.list().data[0].id
        self.pool = ThreadPoolExecutor(max_workers=spec.request_concurrency)

    def _one(self, r: Request) -> Generation:
        s = self.spec.sampling
        try:
            resp = self.client.chat.completions.create(
                model=self.model,
                messages=to_openai_messages(r.messages, r.image),  # type: ignore[arg-type]  # plain dicts of that shape
                max_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=r.seed,
            )
        except Exception as err:  # noqa: BLE001 - one failed request is one model_error row
            if is_fatal(err):  # unreachable server, timeout: the engine's failure, not this request's
                raise
            return Generation(text=None, error=f"{type(err).__name__}: {err}"[:500])
        choice = resp.choices[0]
        usage = resp.usage
        return Generation(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            n_prompt_tokens=usage.prompt_tokens if usage else None,
            n_output_tokens=usage.completion_tokens if usage else None,
        )

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        return list(self.pool.map(self._one, requests))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
