"""vecap: visual-enriched captions (VeCLIP's VeCap) for CLIP training sets.

Stages, each reading the previous stage's files (docs/architecture.md):
``images/`` (img2dataset) → ``captions/`` (VLM) → ``fused/`` (LLM) → ``vecap/`` rows + ``clip/`` CLIP-ready tars.
"""

__version__ = "0.3.0"
