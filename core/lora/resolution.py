"""On-demand adapter resolution: one load per name at a time, and the base-model check resolvers share.

A request naming an adapter nobody loaded makes the LoRA manager ask the resolver plugins
(:func:`resolve_and_load`) on the submitting thread, never on the engine thread nor an event loop:
the engine process's resolution pool (:mod:`~loraserve.ipc.engine_process`), a worker thread of the
in-process async API (:mod:`~loraserve.engine.python_api`), or a Python API caller's thread.
:class:`SingleFlight` lets the manager run one resolution per adapter name while later callers for
the same name wait for it and share its outcome, so many concurrent first requests cause one load.
:func:`check_base_model` is the rule the built-in resolvers apply to an adapter they found:
``base_model_name_or_path`` in its ``adapter_config.json``, where present, names the model this
server serves (a hub id, a local path, or the served name), else the adapter is refused with a 400
naming both.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from loraserve.contract import AdapterError
from loraserve.errors import Conflict, UserError
from loraserve.lora.policy import shown

T = TypeVar("T")

# huggingface_hub's cache folder of a repository: .../models--ORG--NAME/snapshots/REVISION
_HUB_CACHE_DIR = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


class SingleFlight:
    """At most one call of ``fn`` per key at a time; callers arriving meanwhile wait for it and get its
    result or its exception. Thread-safe; keeps nothing once a call ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, Future] = {}

    def run(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = Future()
        if not leader:
            return call.result()
        try:
            result = fn()
        except BaseException as exc:
            call.set_exception(exc)
            raise
        else:
            call.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]

    def in_flight(self) -> list[str]:
        """The keys whose call is running now."""
        with self._lock:
            return list(self._calls)


def make_resolvers(plugins: Any, settings: Any, policy: Any) -> list:
    """The registered resolvers, built; none when runtime updates are off (a resolver loads adapters
    on demand: a runtime update the operator may have switched off)."""
    if not policy.runtime_updates:
        return []
    return [plugins.resolvers.create(r.name, settings) for r in plugins.resolvers]


def resolve_and_load(name: str, resolvers: list, registry: Any, load: Callable[..., Any]) -> None:
    """Load ``name`` from the first of ``resolvers`` that knows it, with ``load`` (the manager's
    ``load_adapter``); nothing when ``registry`` has it already (a flight before this one loaded it)
    or no resolver knows it. A failure names the resolver and the source: the load's own UserError
    (400 invalid, 403 refused, 404 missing files), or a UserError for anything else."""
    if registry.get(name) is not None:
        return
    for resolver in resolvers:
        source = resolver.resolve(name)
        if source is None:
            continue
        found = f"adapter {name!r} found by resolver {resolver.name!r} at {shown(source, 300)}"
        try:
            # runtime=False: an enabled resolver is the operator's choice of sources, as --lora-paths
            # is (the hub resolver keeps its own allow-list); --lora-allowed-dirs still applies
            load(name, source, runtime=False)
        except Conflict:
            pass  # loaded by another path (POST /load_lora_adapter) meanwhile
        except UserError as exc:
            raise type(exc)(f"{found}: {exc}") from None
        except Exception as exc:  # unreadable or corrupt files: found, but not loadable
            raise UserError(f"{found} could not be loaded ({type(exc).__name__}: {exc}); check its files") from None
        return


def served_model_names(settings: Any) -> list[str]:
    """What ``base_model_name_or_path`` may say for this server: ``--model-path`` and
    ``--served-model-name``, when given."""
    return [n for n in (getattr(settings, "model_path", None), getattr(settings, "served_model_name", None)) if n]


def _identities(model: str) -> set[str]:
    """The spellings that name the same model: the text, its real path when it exists, the hub id of
    a hub cache snapshot, and the last one or two path components (a hub id ``ORG/NAME`` names the
    same model as a local copy ``.../NAME`` or ``.../ORG/NAME``)."""
    text = model.rstrip("/")
    out = {text.casefold()}
    path = Path(text).expanduser()
    if path.exists():
        out.add(os.path.realpath(path).casefold())
    cached = _HUB_CACHE_DIR.search(text)
    if cached is not None:
        out.add(f"{cached['org']}/{cached['name']}".casefold())
    parts = [p for p in text.split("/") if p]
    if parts:
        out.add(parts[-1].casefold())
    return out


def same_model(declared: str, served: str) -> bool:
    """Whether ``declared`` (an adapter config's ``base_model_name_or_path``) names ``served``."""
    return bool(_identities(declared) & _identities(served))


def check_base_model(config_path: Path, settings: Any, adapter: str) -> None:
    """Refuse (AdapterError, 400) an adapter whose ``adapter_config.json`` names a base model other than
    the one served; nothing to check when it names none, or when the served model has no name."""
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(
            f"adapter {shown(adapter)}: cannot read {shown(str(config_path), 300)} ({type(exc).__name__}: {exc}); "
            "re-save the adapter with PEFT's save_pretrained"
        ) from None
    declared = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    served = served_model_names(settings)
    if not isinstance(declared, str) or not declared.strip() or not served:
        return
    if not any(same_model(declared, s) for s in served):
        raise AdapterError(
            f"adapter {shown(adapter)} was trained for base model {shown(declared, 300)} "
            f"(base_model_name_or_path in adapter_config.json), but this server serves {shown(served[0], 300)}; "
            "load an adapter trained for the served model, or fix base_model_name_or_path if it is wrong"
        )
