"""Prompt templates from ``prompts/<stage>/<id>.yaml`` (package data ``vecap.prompts``, see ``vecap.resources``).

A prompt file holds a one-line ``description``, an optional ``system`` instruction,
a ``template`` with named placeholders (``{alt_text}``, ``{vlm_caption}``) and optional
few-shot ``examples``. The id is the file's stem and the sha256 of the file's bytes
goes into every output row, so a caption can always be traced to the exact prompt.

Messages put the fixed text (system, few-shot turns) first and the sample's data
last, so that vLLM's prefix caching serves the shared prefix once per engine.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vecap.resources import package_data

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PROMPTS_DIR = package_data("prompts")  # the repository's prompts/<stage>/<id>.yaml
_ALLOWED_KEYS = {"description", "system", "template", "examples"}


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    id: str
    stage: str
    description: str
    template: str
    sha256: str
    system: str | None = None
    examples: tuple[dict[str, str], ...] = field(default_factory=tuple)

    @property
    def placeholders(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.template) if name}

    def render_text(self, **fields: str) -> str:
        """The user turn's text; values are inserted verbatim (braces in them are harmless)."""
        missing = self.placeholders - fields.keys()
        if missing:
            raise PromptError(f"prompt {self.stage}/{self.id} needs {sorted(missing)}")
        return self.template.format_map({k: fields[k] for k in self.placeholders})

    def messages(self, image: bool = False, **fields: str) -> list[dict[str, Any]]:
        """Chat messages: system, few-shot turns, then the sample (with an image part if asked)."""
        msgs: list[dict[str, Any]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system.strip()})
        for ex in self.examples:
            msgs.append({"role": "user", "content": self.render_text(**ex)})
            msgs.append({"role": "assistant", "content": ex["output"].strip()})
        text = self.render_text(**fields)
        content: Any = [{"type": "image"}, {"type": "text", "text": text}] if image else text
        msgs.append({"role": "user", "content": content})
        return msgs


def _stage_dir(stage: str, prompts_dir: str | Path | Traversable | None) -> Traversable:
    base = PROMPTS_DIR if prompts_dir is None else prompts_dir
    return (Path(base) if isinstance(base, str) else base) / stage


def load_prompt(stage: str, prompt_id: str, prompts_dir: str | Path | Traversable | None = None) -> Prompt:
    """Load ``prompts/<stage>/<prompt_id>.yaml``; ``prompt_id`` may also be a path to a YAML file."""
    candidate = Path(prompt_id)
    path: Path | Traversable
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        path = candidate
    else:
        path = _stage_dir(stage, prompts_dir) / f"{prompt_id}.yaml"
    if not path.is_file():
        raise PromptError(f"no prompt '{prompt_id}' for stage {stage} (available: {list_prompts(stage, prompts_dir)})")
    raw = path.read_bytes()
    data = yaml.safe_load(raw) or {}
    unknown = set(data) - _ALLOWED_KEYS
    if unknown:
        raise PromptError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not isinstance(data.get("template"), str):
        raise PromptError(f"{path}: 'template' (a string) is required")
    examples = tuple(dict(ex) for ex in data.get("examples") or ())
    prompt = Prompt(
        id=path.name.rsplit(".", 1)[0],
        stage=stage,
        description=str(data.get("description", "")).strip(),
        template=data["template"].strip(),
        sha256=hashlib.sha256(raw).hexdigest(),
        system=data.get("system"),
        examples=examples,
    )
    for ex in examples:
        if "output" not in ex:
            raise PromptError(f"{path}: every example needs an 'output'")
        prompt.render_text(**ex)  # fail now on a placeholder an example lacks
    return prompt


def list_prompts(stage: str, prompts_dir: str | Path | Traversable | None = None) -> list[str]:
    folder = _stage_dir(stage, prompts_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
