"""Moved to :mod:`loraserve.contract` (this re-export goes once every import is updated)."""

from loraserve.contract import LoRABackend, check_run_lora_args  # noqa: F401
