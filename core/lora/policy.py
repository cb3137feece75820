"""What the operator allows to be loaded: adapter names, and where adapter weights may come from.

:func:`check_adapter_name` is the one rule every path that names an adapter goes through (the HTTP
load and unload, the Python API, ``--lora-paths``): 1 to :data:`MAX_NAME_CHARS` characters from
:data:`NAME_CHARS`, and not ``base``. The set keeps a path usable as a name (SGLang names an adapter
given as ``--lora-paths PATH`` by its path), leaves out ``:`` (the OpenAI API's ``model`` is
``BASE:ADAPTER``), ``=`` (``--lora-paths NAME=PATH``), whitespace and control characters, and holds
only ASCII, so a name can be echoed in a message, a JSON answer or a metric label without failing.

:class:`AdapterSourcePolicy` is built once from the settings and handed to the LoRA manager, which
asks it before reading anything (:meth:`~AdapterSourcePolicy.check_source`); loaders ask it for every
file they open (:meth:`~AdapterSourcePolicy.check_file`). It holds ``--lora-allowed-dirs`` (real
paths; none means any local directory, as SGLang), whether runtime loads may fetch from the Hugging
Face hub (``--lora-allow-hub``, ``--lora-allowed-hub-repos``; start-up adapters always may: the
operator typed them) and whether adapters may be loaded and unloaded at run time at all
(``--disable-lora-runtime-updates``). A refusal is an :class:`AdapterRefused`, which the HTTP routes
answer with 403 and a message naming the flag to change.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from loraserve.errors import ConfigError, Forbidden, UserError

MAX_NAME_CHARS = 256
NAME_CHARS = "A-Z a-z 0-9 . _ / @ + -"
RESERVED_NAMES = frozenset({"base"})
MAX_SOURCE_CHARS = 4096  # PATH_MAX on Linux
# stated in the OpenAPI document too: the characters, and no ".." between slashes
NAME_PATTERN = r"^(?!(.*/)?\.\.(/|$))[A-Za-z0-9._/@+\-]+$"
_NAME = re.compile(NAME_PATTERN)
# control characters (Unicode category Cc) are refused in a source; stated in the OpenAPI document too
SOURCE_PATTERN = "^[^\u0000-\u001f\u007f-\u009f]*$"
_CONTROL = re.compile("[\u0000-\u001f\u007f-\u009f]")
# A Hugging Face repository id: ORG/NAME (huggingface_hub's own rule, without the length limit).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HUB_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_SHOWN_CHARS = 80


class AdapterRefused(Forbidden):
    """The operator's settings forbid this load or unload; the message names the flag to change."""


def shown(value: Any, most: int = _SHOWN_CHARS) -> str:
    """``value`` quoted for a message: ASCII only (nothing that cannot be encoded), cut to ``most``."""
    text = ascii(value)
    if len(text) > most:
        length = f" ({len(value)} characters)" if isinstance(value, str) else ""
        text = f"{text[: most - 3]}...{length}"
    return text


def check_adapter_name(name: Any) -> str:
    """Return ``name`` if it is a valid adapter name, else raise a UserError naming it and the rule."""
    rule = (
        f"an adapter name is 1 to {MAX_NAME_CHARS} characters from {NAME_CHARS} (no spaces, ':' or '='), "
        f"with no '..' between slashes, and not {', '.join(repr(n) for n in sorted(RESERVED_NAMES))}"
    )
    if not isinstance(name, str):
        raise UserError(f"invalid adapter name {shown(name)} (a {type(name).__name__}); {rule}")
    if name in RESERVED_NAMES or len(name) > MAX_NAME_CHARS or _NAME.fullmatch(name) is None:
        raise UserError(f"invalid adapter name {shown(name)}; {rule}")
    return name


def check_source_text(source: Any) -> str:
    """Return ``source`` if it is printable text a path or hub id can be, else raise a UserError."""
    if not isinstance(source, str) or not source.strip():
        raise UserError(
            f"adapter source {shown(source)} is empty or not a string; pass a PEFT adapter directory "
            "or a hub id (org/name)"
        )
    if len(source) > MAX_SOURCE_CHARS or _CONTROL.search(source) is not None or not _encodes(source):
        raise UserError(
            f"adapter source {shown(source)} holds control characters or undecodable text, or is "
            f"longer than {MAX_SOURCE_CHARS} characters; pass a plain directory path or hub id"
        )
    return source


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a file name that is not UTF-8
        return False
    return True


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` that is not an existing local path: a loader fetches it from the hub."""
    return (
        _HUB_ID.fullmatch(source) is not None and ".." not in source and not os.path.lexists(os.path.expanduser(source))
    )


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class AdapterSourcePolicy:
    """Where adapters may come from. The defaults allow what SGLang allows: any local directory,
    the hub at start-up, and loading and unloading at run time."""

    #: real paths of the directories adapters must lie in; None: anywhere
    allowed_dirs: tuple[str, ...] | None = None
    #: whether runtime loads may fetch any hub repository
    allow_hub: bool = False
    #: ``ORG`` or ``ORG/REPO`` entries runtime loads may fetch from without ``allow_hub``
    allowed_hub_repos: tuple[str, ...] = ()
    #: whether adapters may be loaded and unloaded at run time (HTTP, resolvers)
    runtime_updates: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> AdapterSourcePolicy:
        """The policy of ``settings``; a ConfigError when an allowed directory is not a directory."""
        dirs = None
        if settings.lora_allowed_dirs is not None:
            dirs = []
            for d in settings.lora_allowed_dirs:
                real = os.path.realpath(os.path.expanduser(d))
                if not os.path.isdir(real):
                    raise ConfigError(
                        f"--lora-allowed-dirs {d!r} is not a directory (it resolves to {real!r}); "
                        "give existing directories that hold adapter directories"
                    )
                dirs.append(real)
        return cls(
            allowed_dirs=None if dirs is None else tuple(dirs),
            allow_hub=settings.lora_allow_hub,
            allowed_hub_repos=tuple(settings.lora_allowed_hub_repos or ()),
            runtime_updates=not settings.disable_lora_runtime_updates,
        )

    def check_runtime_updates(self) -> None:
        """Refuse a runtime load or unload when the operator switched them off."""
        if not self.runtime_updates:
            raise AdapterRefused(
                "loading and unloading adapters at run time is disabled on this server "
                "(--disable-lora-runtime-updates); give the adapters at start-up with --lora-paths, "
                "or restart without --disable-lora-runtime-updates"
            )

    def check_source(self, source: str, *, runtime: bool) -> None:
        """Refuse ``source`` before anything is read: a hub id at run time that the hub settings do not
        allow, or a local path outside ``--lora-allowed-dirs``. ``runtime``: an HTTP or on-demand load,
        not a start-up ``--lora-paths`` entry."""
        check_source_text(source)
        if looks_like_hub_id(source):
            if runtime and not self.hub_allowed(source):
                raise AdapterRefused(
                    f"adapter source {shown(source)} is a Hugging Face hub id, and this server fetches adapters "
                    "from the hub at run time only when started with --lora-allow-hub, or with the repository or "
                    "its organisation in --lora-allowed-hub-repos; set one of those, or load it at start-up with "
                    "--lora-paths, or pass a local directory"
                )
            return  # the hub's files are the hub's: --lora-allowed-dirs governs local paths only
        self.check_file(source, what="adapter source")

    def hub_allowed(self, repo_id: str) -> bool:
        """Whether a runtime load may fetch ``repo_id`` (``ORG/REPO``) from the hub."""
        if self.allow_hub:
            return True
        org = repo_id.split("/", 1)[0].casefold()  # hub names are unique regardless of case
        return any(entry.casefold() in (org, repo_id.casefold()) for entry in self.allowed_hub_repos)

    def check_file(self, path: str | os.PathLike, what: str = "adapter file") -> str:
        """The real path of ``path`` (symlinks resolved), refused unless it lies inside an allowed dir."""
        given = os.path.expanduser(os.fspath(path))
        real = os.path.realpath(given)
        if self.allowed_dirs is None or any(_inside(real, d) for d in self.allowed_dirs):
            return real
        resolves = "" if real == os.path.abspath(given) else f" resolves to {shown(real, 300)}, which"
        raise AdapterRefused(
            f"{what} {shown(os.fspath(path), 300)}{resolves} lies outside --lora-allowed-dirs "
            f"({', '.join(self.allowed_dirs)}); put the adapter inside one of them (symbolic links must not lead "
            "out of them), or add its directory to --lora-allowed-dirs"
        )


def check_hub_entries(entries: Iterable[str]) -> list[str]:
    """``--lora-allowed-hub-repos`` entries, each ``ORG`` or ``ORG/REPO``; a ValueError naming a bad one."""
    out = []
    for entry in entries:
        if _HUB_ENTRY.fullmatch(entry) is None or ".." in entry:
            raise ValueError(f"{shown(entry)} is not a hub organisation (ORG) or repository (ORG/REPO)")
        out.append(entry)
    return out
