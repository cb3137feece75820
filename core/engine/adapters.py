"""The adapter calls a frontend makes (``EngineClient``'s loads, unload, servable and update checks),
over the engine's LoRA manager (None when LoRA is off).

They add what a caller outside the engine needs on top of the manager's own calls: a clear refusal
when LoRA is off or runtime updates are switched off (``--disable-lora-runtime-updates``), and a
load whose files cannot be read turned into a :class:`~loraserve.errors.UserError` naming the
adapter and its source (the manager never leaves a failed load half-visible, so the server lives on).
Start-up ``--lora-paths`` loads go to the manager directly: they fail the start instead.
"""

from __future__ import annotations

from typing import Any

from loraserve.errors import UserError
from loraserve.lora.policy import shown


def check_updates(lora: Any) -> None:
    """UserError when LoRA is off; Forbidden when runtime loading and unloading are switched off."""
    if lora is None:
        raise UserError(
            "LoRA is not enabled on this server; start it with --enable-lora (and "
            "--max-lora-rank/--lora-target-modules) or --lora-paths"
        )
    lora.policy.check_runtime_updates()


def load(lora: Any, adapter: str, source: str, pinned: bool, load_inplace: bool = False) -> None:
    """Load ``adapter`` from ``source`` at run time; any failure is a UserError (see the module)."""
    check_updates(lora)
    try:
        lora.load_adapter(adapter, source, pinned, load_inplace=load_inplace)
    except UserError:
        raise
    except Exception as exc:  # a corrupt or unreadable adapter: never half-loaded, the server lives on
        raise UserError(
            f"could not load adapter {shown(adapter)} from {shown(source, 300)} "
            f"({type(exc).__name__}: {exc}); check the adapter files"
        ) from None


def load_from_tensors(
    lora: Any, adapter: str, config: dict, tensors: bytes, pinned: bool, load_inplace: bool = False
) -> None:
    """Load ``adapter`` from its config and safetensors bytes at run time; any failure is a UserError."""
    check_updates(lora)
    try:
        lora.load_adapter_from_tensors(adapter, config, tensors, pinned, load_inplace=load_inplace)
    except UserError:
        raise
    except Exception as exc:  # never half-loaded, the server lives on
        raise UserError(
            f"could not load adapter {shown(adapter)} from the tensors sent ({type(exc).__name__}: {exc}); "
            "send the content of adapter_config.json and the bytes of adapter_model.safetensors"
        ) from None


def unload(lora: Any, adapter: str, timeout: float | None) -> int:
    """Unload ``adapter``; the number of in-flight requests still holding it after ``timeout`` seconds."""
    check_updates(lora)
    return lora.unload_adapter(adapter, timeout)


def is_servable(lora: Any, adapter: str) -> bool:
    """Whether requests may name ``adapter``: loaded, or known to a resolver plugin (which may do I/O)."""
    if lora is None:
        return False
    if adapter in lora.registry.names():
        return True
    # one resolver check per name at a time: concurrent first requests share it (the OpenAI routes ask
    # this before they submit; a resolver may do I/O, e.g. fsspec)
    return lora.servable_checks.run(adapter, lambda: any(r.resolve(adapter) is not None for r in lora.resolvers))
