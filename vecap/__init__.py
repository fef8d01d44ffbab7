"""vecap: visual-enriched captions (VeCLIP's VeCap) for CLIP training sets.

Stages, each reading the previous stage's files (see README and DESIGN):
``images/`` (img2dataset) → ``captions/`` (VLM) → ``fused/`` (LLM) → ``vecap/`` (CLIP-ready shards).
"""

__version__ = "0.1.0"
