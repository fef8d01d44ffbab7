"""The model-engine interface shared by every backend and both model stages.

A stage hands an engine a list of :class:`Request` (chat messages, an optional image,
a per-sample seed) and gets one :class:`Generation` per request back, in order. A
backend writes one method, :meth:`ChatEngine._generate`; the base class classifies
failures: one bad sample becomes one ``model_error`` row, not a lost batch, while a
failure of the engine itself (:class:`EngineFatal`) is raised, never turned into rows.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters; their hash is the ``params_sha256`` provenance column."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    # Benchmarks with random weights: ignore EOS and stop each request after a length drawn
    # from its seed in [lo, hi], so that output lengths vary as real captions do.
    synthetic_lengths: tuple[int, int] | None = None

    def max_tokens_for(self, seed: int) -> int:
        if self.synthetic_lengths is None:
            return self.max_new_tokens
        lo, hi = self.synthetic_lengths
        return lo + seed % (hi - lo + 1)

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
    request_retries: int = 8


@dataclass
class Request:
    messages: list[dict[str, Any]]
    seed: int
    image: Any = None  # a PIL.Image for captioning, None for text generation
    key: str | None = None  # the sample's key (logs; wrapper backends such as vecap.demo.faulty)


@dataclass
class Generation:
    text: str | None
    finish_reason: str | None = None  # "stop", "length", or None on error
    n_prompt_tokens: int | None = None
    n_output_tokens: int | None = None
    error: str | None = None
    reason: str | None = None  # the failure's code (vecap.vocab) when ``error`` is set; None: model_error


class EngineFatal(RuntimeError):
    """The engine itself failed (dead engine process, device error, out of memory, unreachable
    server): no later request can succeed on it. The actor exits so that Ray restarts it."""


class EngineHung(EngineFatal):
    """The engine is alive but makes no progress: no step and no token for the watchdog's limit."""


@dataclass(frozen=True)
class Progress:
    """How far an engine has got, for the hung-call watchdog: the engine's steps and output tokens
    so far (any change means it is alive and working), and the tokens of one call's requests."""

    steps: int
    tokens: int
    call_tokens: int


_FATAL_NAMES = {"EngineDeadError", "OutOfMemoryError", "APIConnectionError", "APITimeoutError", "ConnectionError"}
_FATAL_TEXT = ("cuda error", "out of memory", "engine core", "enginedead", "device-side assert")


def is_fatal(err: BaseException) -> bool:
    """A failure of the engine, not of one request (one request's failure is a row status)."""
    if isinstance(err, (EngineFatal, MemoryError, ConnectionError, TimeoutError)):
        return True
    if any(t.__name__ in _FATAL_NAMES for t in type(err).__mro__):
        return True
    return any(t in str(err).lower() for t in _FATAL_TEXT)


class ChatEngine(ABC):
    """Base of all backends: the caption and fuse stages both call :meth:`submit` / :meth:`generate`.

    A bad request becomes one ``model_error`` generation; a failing batch is bisected to find
    it (log2(n) calls, not n). A fatal error (:func:`is_fatal`) is raised as :class:`EngineFatal`.
    """

    max_concurrent_calls = 1  # calls to _generate that may run at once (threads)

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.model = spec.model
        self._pool: ThreadPoolExecutor | None = None

    @abstractmethod
    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Run a batch; may raise, in which case the base isolates the failing request(s)."""

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        if not requests:
            return []
        try:
            out = self._generate(requests)
            if len(out) != len(requests):
                raise RuntimeError(f"engine returned {len(out)} results for {len(requests)} requests")
            return out
        except EngineFatal:
            raise
        except Exception as err:  # noqa: BLE001 - classify: the engine's failure, or a request's
            if is_fatal(err):
                raise EngineFatal(f"{type(err).__name__}: {err}"[:500]) from err
            if len(requests) == 1:
                log.warning("request failed: %s", err)
                return [Generation(text=None, error=f"{type(err).__name__}: {err}"[:500])]
            half = len(requests) // 2
            log.warning("batch of %d failed (%s); bisecting to find the bad request(s)", len(requests), err)
            return self.generate(requests[:half]) + self.generate(requests[half:])

    def submit(self, requests: Sequence[Request]) -> Future:
        """Start a batch; the future gives its generations. Several batches may be in flight:
        engines that batch continuously (vLLM) keep working across them."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent_calls, thread_name_prefix="engine")
        return self._pool.submit(self.generate, list(requests))

    def progress(self, future: Future) -> Progress | None:
        """The engine's progress while ``future`` (from :meth:`submit`) is pending; None where the
        backend cannot tell, and then the watchdog's limit is on the call's wall time."""
        return None

    def kill(self) -> None:  # noqa: B027 - optional: most backends have no processes of their own
        """Stop the engine's own processes at once, before the actor exits after a fatal error
        (nothing to do where the engine lives in the actor's process)."""

    def stats(self) -> dict[str, float]:
        """Cumulative engine counters (e.g. steps, busy seconds) where the backend has them."""
        return {}

    def close(self) -> None:
        """Release the engine's resources (GPU memory, threads)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)


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
