"""The recipes shipped with vecap (``vecap.pipelines``, package data): ``--config NAME`` loads ``NAME.yaml``.

The loader is ``vecap.config``; this folder holds data only.
"""
