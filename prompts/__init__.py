"""The prompt templates shipped with vecap (``vecap.prompts``, package data): ``<stage>/<id>.yaml``.

The loader is ``vecap.prompting``; this folder holds data only.
"""
