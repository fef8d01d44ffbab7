"""Typed pipeline configuration, loaded from ``pipelines/*.yaml``.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``caption.batch_sise`` fails at load time with the key's dotted name instead of
being silently ignored on a thousand-GPU run. ``--set a.b=value`` overrides are
parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RayConfig(_Section):
    """How to reach Ray. Without ``address`` (and without ``RAY_ADDRESS``) a local Ray starts in-process."""

    address: str | None = None
    # Logical CPUs of the embedded local Ray. More than the physical cores on purpose:
    # engine actors hold a CPU each, and Ray Data must still find one for its read tasks.
    num_cpus: int = 8
    object_store_memory_mb: int = 1024
    # Environment for the driver and every Ray worker (e.g. VLLM_CPU_KVCACHE_SPACE on CPU machines).
    env: dict[str, str] = Field(default_factory=dict)


class ModelConfig(_Section):
    """A model engine served by long-lived Ray actors (shared by the caption and fuse stages)."""

    backend: Literal["vllm", "hf", "openai"] = "vllm"
    model: str = ""
    prompt: str = ""
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, ge=0)
    # Requests handed to one engine call: vLLM batches continuously inside it, so larger
    # batches keep the engine full; the in-flight window is actors x (this) x 2.
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    dtype: str = "auto"
    trust_remote_code: bool = False
    # Extra keyword arguments for the engine (vllm.LLM(...) or from_pretrained(...)).
    engine: dict[str, Any] = Field(default_factory=dict)
    # openai backend: an OpenAI-compatible server (e.g. `vllm serve`).
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    request_concurrency: int = Field(16, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)


class CaptionConfig(ModelConfig):
    prompt: str = "concise"
    # Images are resized on the CPU workers so that the shorter side is at most this
    # (never upscaled) before they reach an actor: actors never see megapixel images.
    image_size: int = Field(336, ge=8)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)


class FuseConfig(ModelConfig):
    prompt: str = "vecap"
    max_new_tokens: int = Field(96, ge=1)
    # Alt-text longer than this (in words, a cheap proxy for tokens) is truncated before prompting.
    max_alt_text_words: int = Field(64, ge=1)
    # A fused caption longer than this many words is rejected as runaway output.
    max_caption_words: int = Field(80, ge=1)
    require_entities: bool = True


class WriteConfig(_Section):
    """How the CLIP-ready shards mix alt-text and VeC captions."""

    mix: Literal["random", "vec", "alt", "both"] = "random"
    p_vec: float = Field(0.5, ge=0, le=1)
    # Image formats copied into the output tars (what open_clip's loader reads). Others are
    # never re-encoded: they stay out of the tar with status "unsupported_format".
    image_exts: list[str] = Field(default_factory=lambda: ["jpg", "png", "webp"])


class PipelineConfig(_Section):
    """A whole recipe: where the data lives and how each stage runs."""

    root: str = "data/sample"
    seed: int = 0
    max_inflight_shards: int = Field(4, ge=1)
    ray: RayConfig = Field(default_factory=RayConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def stage_dir(self, name: str) -> Path:
        return self.root_path / name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {source}: " + "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"caption.batch_size=32"`` → (["caption", "batch_size"], 32)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set has an empty key: {item!r}")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a recipe file (or the defaults) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"invalid config {source}: top level must be a mapping")
        data = loaded
    data = apply_overrides(data, list(overrides or []))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object with sorted keys: the provenance fingerprint of params."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
