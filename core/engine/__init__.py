"""The engine stage: the engine loop (:mod:`.engine`), what a frontend may ask of it
(:mod:`.client`: ``EngineClient``; :mod:`.adapters` and :mod:`.stats` answer part of it), its
builder, the tensor-parallel driver, the intake bounds and the outputs (detokenization, stop checks).

``from loraserve.engine import Engine`` is the Python API's entry point.
"""

from __future__ import annotations

from loraserve.engine.engine import Engine

__all__ = ["Engine"]
