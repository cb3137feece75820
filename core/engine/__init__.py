"""The engine stage: the engine loop (:mod:`.engine`), its builder, the tensor-parallel driver, the
intake bounds and the outputs (detokenization, stop checks).

``from loraserve.engine import Engine`` is the Python API's entry point.
"""

from __future__ import annotations

from loraserve.engine.engine import Engine

__all__ = ["Engine"]
