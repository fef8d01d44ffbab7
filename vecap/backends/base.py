"""The model-engine interface shared by every backend and both model stages.

A stage hands an engine a list of :class:`Request` (chat messages, an optional image,
a per-sample seed) and gets one :class:`Generation` per request back, in order. A
backend writes one method, :meth:`ChatEngine._generate`; the base class isolates
failures (a batch that raises is retried request by request, so one bad sample
becomes one ``model_error`` row, not a lost batch).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters; their hash is the ``params_sha256`` provenance column."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to start an engine, independent of the pipeline config."""

    backend: str
    model: str
    multimodal: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    dtype: str = "auto"
    trust_remote_code: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_concurrency: int = 16
    request_timeout_s: float = 120.0


@dataclass
class Request:
    messages: list[dict[str, Any]]
    seed: int
    image: Any = None  # a PIL.Image for captioning, None for text generation


@dataclass
class Generation:
    text: str | None
    finish_reason: str | None = None  # "stop", "length", or None on error
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    error: str | None = None


class ChatEngine(ABC):
    """Base of all backends: the caption and fuse stages both call :meth:`generate`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.model = spec.model

    @abstractmethod
    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Run a batch; may raise, in which case the base retries requests one by one."""

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        if not requests:
            return []
        try:
            out = self._generate(requests)
            if len(out) != len(requests):
                raise RuntimeError(f"engine returned {len(out)} results for {len(requests)} requests")
            return out
        except Exception as err:  # noqa: BLE001 - isolate the failing request(s)
            if len(requests) == 1:
                log.warning("request failed: %s", err)
                return [Generation(text=None, error=f"{type(err).__name__}: {err}"[:500])]
            log.warning("batch of %d failed (%s); retrying one by one", len(requests), err)
            return [g for r in requests for g in self.generate([r])]


    def close(self) -> None:
        """Release the engine's resources (GPU memory, threads)."""


def load_chat_renderer(model: str, trust_remote_code: bool):
    """The model's chat template as a function messages → prompt string.

    vLLM and transformers are given the same rendered string, so both backends see
    exactly the same tokens (and greedy outputs match).
    """
    from transformers import AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        proc = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    if getattr(proc, "chat_template", None) is None and hasattr(proc, "tokenizer"):
        proc = proc.tokenizer

    def render(messages: list[dict[str, Any]]) -> str:
        return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render, proc
