"""Typed pipeline configuration: a recipe file, or a recipe shipped with the package (``demo``, ``gpu``).

Every section is a pydantic model that forbids unknown keys, so a typo such as
``caption.batch_sise`` fails at load time with the key's dotted name instead of
being silently ignored on a thousand-GPU run. ``--set a.b=value`` overrides are
parsed as YAML scalars (taken as typed where the schema wants a string, such as
``ray.env.VLLM_ENABLE_V1_MULTIPROCESSING=1``) and validated the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vecap.resources import package_data

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


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
    # The local Ray's dashboard on 127.0.0.1 (`vecap run --dashboard`); the run logs its address.
    dashboard: bool = False
    dashboard_port: int | None = Field(None, ge=1, le=65535)  # None: 8265, or the next free port
    # The local Ray's Prometheus endpoint (http://127.0.0.1:PORT/metrics); None: a free port, logged.
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    # Stream every worker's stdout/stderr to the driver's terminal; off: they stay in the worker
    # logs (<root>/logs/<run id>/ and Ray's session logs) and the terminal shows vecap's progress.
    log_to_driver: bool = False


class ModelConfig(_Section):
    """A model engine served by long-lived Ray actors (shared by the caption and fuse stages)."""

    # vllm | hf | openai | dry, or "package.module:Class" for a ChatEngine of your own.
    backend: str = Field("vllm", pattern=r"^(vllm|hf|openai|dry|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
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
    # Connection errors and 5xx replies are retried with exponential back-off (0.5 s doubling to 8 s:
    # 8 retries ride out about 40 s of a server restarting) before the engine counts as failed.
    request_retries: int = Field(8, ge=0)
    # Batches one actor works on at once: the engine batches continuously across them, so
    # batch_size x max_batches_in_flight should exceed the engine's max_num_seqs.
    max_batches_in_flight: int = Field(4, ge=1)
    # The hung-engine watchdog: an engine call during which the engine makes no progress (no
    # step, no token) for this long means a stuck engine; the actor exits and is restarted. A dead
    # engine process is found in seconds without it. Backends that report no progress (hf,
    # openai, which has its own request_timeout_s): the limit is on the call's wall time.
    call_timeout_s: float = Field(300.0, gt=0)
    # Benchmarks with random weights only: ignore EOS and draw each request's output length in
    # [lo, hi] from its seed (vllm backend), e.g. [8, 40] for captions, [20, 80] for fusions.
    synthetic_lengths: tuple[int, int] | None = None
    # Environment of this stage's engine actors only (e.g. VLLM_ENABLE_V1_MULTIPROCESSING).
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _server_needs_an_address(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


def _known_checks(stage: str, names: list[str]) -> list[str]:
    """``skip`` names must be checks of the stage: the registry of vecap.validation.checks says which."""
    from vecap.validation.checks import CAPTION_REASONS, FUSE_REASONS  # imported late: it imports this module

    known = CAPTION_REASONS if stage == "caption" else FUSE_REASONS
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; the {stage} stage's checks: {', '.join(known)}")
    return names


class CaptionChecks(_Section):
    """Thresholds of the VLM-caption validator (``vecap.validation.check_caption``)."""

    min_words: int = Field(2, ge=0)
    max_words: int = Field(100, ge=1)
    # A unit (word, phrase, CJK character run) repeated this many times in a row is a loop.
    max_repeats: int = Field(3, ge=2)
    # Share of repeated word trigrams (character 4-grams for CJK) from which the text is a loop.
    max_repetition: float = Field(0.25, gt=0, le=1)
    # The language captions must be in (ISO 639-1, e.g. "de"); None: the prompt's language; "any": not checked.
    language: str | None = None
    # Checks not run, by name (vecap.validation.checks.CAPTION_CHECKS, in the order they run).
    skip: list[str] = Field(default_factory=list)

    @field_validator("skip")
    @classmethod
    def _skip(cls, names: list[str]) -> list[str]:
        return _known_checks("caption", names)


class FuseChecks(_Section):
    """Thresholds of the fused-caption validator (``vecap.validation.check_fused``)."""

    min_words: int = Field(3, ge=0)
    max_words: int = Field(80, ge=1)
    max_repeats: int = Field(3, ge=2)
    max_repetition: float = Field(0.25, gt=0, le=1)
    # Weighted share of the alt-text's names and numbers the caption must keep.
    min_entity_recall: float = Field(0.5, ge=0, le=1)
    # Share of the VLM caption's content words under which a caption counts as not using it
    # (with an instruction in the alt-text: an obeyed injection).
    min_visual_overlap: float = Field(0.2, ge=0, le=1)
    # Names, numbers or URLs found in neither source that a caption may hold.
    max_novel: int = Field(0, ge=0)
    # Checks not run, by name (vecap.validation.checks.FUSE_CHECKS, in the order they run).
    skip: list[str] = Field(default_factory=list)

    @field_validator("skip")
    @classmethod
    def _skip(cls, names: list[str]) -> list[str]:
        return _known_checks("fuse", names)


class CaptionConfig(ModelConfig):
    prompt: str = "concise"
    # Images are resized on the CPU workers so that the shorter side is at most this
    # (never upscaled) before they reach an actor: actors never see megapixel images.
    # None: no bound on the shorter side (then image_pixels must bound the area).
    image_size: int | None = Field(336, ge=8)
    # ... and so that width x height is at most this, aspect ratio kept (None: no such bound). For
    # native-resolution VLMs (Qwen2-VL, Qwen2.5-VL: image_size null, image_pixels = the processor's
    # max_pixels), whose processor then rounds each side to its patch grid instead of cropping a square.
    image_pixels: int | None = Field(None, ge=64)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)
    validation: CaptionChecks = Field(default_factory=CaptionChecks)
    # Identical images (img2dataset's sha256) are captioned once per run; their copies reuse it.
    dedup: bool = True
    # A caption cache shared by runs (local path or URI, e.g. s3://bucket/vecap-cache), keyed by
    # image sha256 and this stage's fingerprint; cache_storage_options default to the root's.
    cache: str | None = None
    cache_storage_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _images_are_bounded(self) -> CaptionConfig:
        if self.image_size is None and self.image_pixels is None:
            raise ValueError("image_size and image_pixels are both null: set one (the VLM's input is bounded)")
        return self


class FuseConfig(ModelConfig):
    prompt: str = "vecap"
    max_new_tokens: int = Field(96, ge=1)
    # Alt-text longer than this (in words, a cheap proxy for tokens) is truncated before prompting.
    max_alt_text_words: int = Field(64, ge=1)
    validation: FuseChecks = Field(default_factory=FuseChecks)


class WriteConfig(_Section):
    """How the CLIP-ready shards mix alt-text and VeC captions."""

    mix: Literal["random", "vec", "alt", "both"] = "random"
    p_vec: float = Field(0.5, ge=0, le=1)
    # Image formats copied into the output tars (what open_clip's loader reads). Others are
    # never re-encoded: they stay out of the tar with status "unsupported_format".
    image_exts: list[str] = Field(default_factory=lambda: ["jpg", "png", "webp"])
    # Optional CLIPScore (vecap.clipscore): a transformers CLIPModel folder or hub id; each written
    # row then gets clip_score_alt/_vlm/_vec, computed in the write stage. None: off (columns null).
    clip_model: str | None = None
    clip_batch_size: int = Field(32, ge=1)


class FaultsConfig(_Section):
    """Bounds on retries and restarts: a poison input or a broken engine never loops forever."""

    max_actor_restarts: int = Field(20, ge=0)  # per engine actor
    max_task_retries: int = Field(12, ge=0)  # per batch; poison isolation needs about log2(batch_size) + 3
    max_consecutive_fatal: int = Field(8, ge=1)  # fatal engine errors in a row before the run stops
    actor_start_retries: int = Field(3, ge=0)  # engine actors whose start-up fails (e.g. a hub rate limit)
    finalize_retries: int = Field(3, ge=0)  # per shard commit, on transient storage errors


class PipelineConfig(_Section):
    """A whole recipe: where the data lives and how each stage runs."""

    # A local path, a shared mount, or an object-store URI (s3://bucket/run1, gs://...).
    root: str = "data/sample"
    # Extra fsspec options for the root's file system (e.g. {"endpoint_url": ...} for s3fs).
    storage_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    # Input shards being read at once; bounds what the stream holds in flight.
    max_inflight_shards: int = Field(4, ge=1)
    # A run's lease on the root expires this long after its last heartbeat.
    lease_ttl_s: float = Field(120.0, gt=0)
    ray: RayConfig = Field(default_factory=RayConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)

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


def _members(annotation: Any) -> set[Any]:
    return set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}


def _takes_text(path: list[str]) -> bool:
    """Whether the recipe's schema wants a string at ``path`` (a ``str`` field, or a value of a
    ``dict[str, str]`` such as ``ray.env``) and no number or boolean there."""
    annotation: Any = PipelineConfig
    for part in path:
        models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
        if models:
            field = models[0].model_fields.get(part)
            if field is None:
                return False  # an unknown key: validation names it
            annotation = field.annotation
        elif get_origin(annotation) is dict and len(get_args(annotation)) == 2:
            annotation = get_args(annotation)[1]
        else:
            return False
    members = _members(annotation)
    return str in members and not members & {int, float, bool, Any}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key=value`` in the recipe's data. Values are YAML scalars, except where the schema
    wants a string: there the text is taken as typed (``ray.env.X=1`` is ``"1"``, ``1.10`` stays
    ``"1.10"``; ``null`` is still None)."""
    for item in overrides:
        path, value = parse_override(item)
        if value is not None and not isinstance(value, (str, list, dict)) and _takes_text(path):
            value = item.split("=", 1)[1].strip()
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


PIPELINES_DIR = package_data("pipelines")  # the packaged recipes: the repository's pipelines/NAME.yaml


def packaged_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``--config NAME``)."""
    return sorted(p.name[: -len(".yaml")] for p in PIPELINES_DIR.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(path: str | Path) -> Path | Traversable:
    """A recipe file path, or the name of a packaged recipe (``demo``, ``gpu``)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.suffix == "" and candidate.name == str(path) and (PIPELINES_DIR / f"{path}.yaml").is_file():
        return PIPELINES_DIR / f"{path}.yaml"
    raise ConfigError(f"config file not found: {path} (packaged recipes: {', '.join(packaged_recipes())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a recipe (a file, or a packaged recipe's name) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        recipe = resolve_recipe(path)
        source = str(path)
        loaded = yaml.safe_load(recipe.read_text()) or {}
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
