"""Start-up adapters: :class:`LoRAPathSpec`, one entry of ``--lora-paths`` (or vLLM's spelling,
``--lora-modules``), parsed from each way it may be written (``PATH``, ``NAME=PATH``, SGLang's JSON
object or vLLM's), and the checks on the list as a whole (:func:`check_lora_paths`).

:class:`~loraserve.settings.Settings` holds the option; this module owns what an entry may say. A
wrong entry raises :class:`ValueError`, which pydantic reports against the flag.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, field_validator

from loraserve.errors import UserError
from loraserve.lora.policy import check_adapter_name


class LoRAPathSpec(BaseModel):
    """One start-up adapter from --lora-paths (or vLLM's spelling, --lora-modules)."""

    lora_name: str
    lora_path: str
    pinned: bool = False

    # vLLM's --lora-modules JSON keys -> ours
    VLLM_KEYS: ClassVar[dict[str, str]] = {"name": "lora_name", "path": "lora_path"}

    @field_validator("lora_name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        try:
            return check_adapter_name(value)
        except UserError as exc:  # pydantic reports ValueErrors only
            raise ValueError(f"{exc}; name an adapter whose PATH is no valid name with NAME=PATH") from None

    @classmethod
    def _from_mapping(cls, data: Any, text: str) -> LoRAPathSpec:
        if not isinstance(data, dict):
            raise ValueError(f"--lora-paths entry {text!r} must be a JSON object, not a JSON {type(data).__name__}")
        data = dict(data)
        data.pop("base_model_name", None)  # vLLM lists it as the parent in /v1/models; ours is the one base
        for vllm_key, key in cls.VLLM_KEYS.items():
            if vllm_key in data:
                if key in data:
                    raise ValueError(f"--lora-paths entry {text!r} gives both {key!r} and {vllm_key!r}; give one")
                data[key] = data.pop(vllm_key)
        unknown = set(data) - {"lora_name", "lora_path", "pinned"}
        if unknown or "lora_name" not in data or "lora_path" not in data:
            raise ValueError(
                f"--lora-paths entry {text!r} needs keys lora_name and lora_path (vLLM's name and "
                f"path are accepted too, and optionally pinned)"
                f"{'; unknown keys: ' + ', '.join(sorted(unknown)) if unknown else ''}"
            )
        return cls.model_validate(data)

    @classmethod
    def parse(cls, value: Any) -> LoRAPathSpec:
        """Accept ``PATH``, ``NAME=PATH`` or JSON ``{"lora_name", "lora_path", "pinned"}`` (SGLang) or
        ``{"name", "path", "base_model_name"}`` (vLLM's --lora-modules)."""
        if isinstance(value, LoRAPathSpec):
            return value
        if isinstance(value, dict):
            return cls._from_mapping(value, json.dumps(value))
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"--lora-paths entry {value!r} is empty; use PATH, NAME=PATH or a JSON object")
        text = value.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"--lora-paths entry {text!r} is not valid JSON ({exc.msg}); "
                    'write {"lora_name": "NAME", "lora_path": "PATH", "pinned": false}'
                ) from None
            return cls._from_mapping(data, text)
        if "=" in text:
            name, path = text.split("=", 1)
            if not name or not path:
                raise ValueError(f"--lora-paths entry {text!r} must be NAME=PATH with both parts non-empty")
            return cls(lora_name=name, lora_path=path)
        return cls(lora_name=text, lora_path=text)  # as SGLang: the path doubles as the name


def parse_lora_paths(value: Any) -> list[LoRAPathSpec] | None:
    """The ``--lora-paths`` option as given: ``None``, one entry, a JSON list (the environment
    variable) or a list of entries."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [text]
    return [LoRAPathSpec.parse(v) for v in value]


def check_lora_paths(specs: list[LoRAPathSpec], max_loras_per_batch: int) -> None:
    """Refuse a name given twice, and more pinned adapters than ``max_loras_per_batch - 1``."""
    names = [s.lora_name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"--lora-paths names adapter(s) {', '.join(dupes)} more than once; give each a unique NAME=PATH"
        )
    pinned = sum(s.pinned for s in specs)
    if pinned > max_loras_per_batch - 1:
        raise ValueError(
            f"--lora-paths pins {pinned} adapters but at most --max-loras-per-batch - 1 = "
            f"{max_loras_per_batch - 1} may be pinned (one slot stays free for the "
            "base model and unpinned adapters); pin fewer or raise --max-loras-per-batch"
        )
