"""Moved to :mod:`loraserve.contract` (this re-export goes once every import is updated)."""

from loraserve.contract import LoRABatchInfo  # noqa: F401
