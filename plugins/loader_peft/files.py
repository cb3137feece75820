"""Finding and reading the files of a PEFT adapter: a local directory or a Hugging Face hub snapshot.

A source is either an existing directory or a hub id (``org/name``) fetched with
``huggingface_hub.snapshot_download``; the offline case (``HF_HUB_OFFLINE=1``) is honoured at call
time, so it never touches the network. Weights come from ``adapter_model.safetensors`` or, failing
that, ``adapter_model.bin`` read with ``torch.load(weights_only=True)``. This module also refuses
adapters that add tokens, judged from the tokenizer files save_pretrained() leaves beside them.
Every failure is an AdapterError naming the file. Given the engine's
:class:`~loraserve.lora.policy.AdapterSourcePolicy`, a local directory and every file of it this
plugin may open (:data:`ADAPTER_FILES`) must resolve inside ``--lora-allowed-dirs``
(:func:`confine`); hub snapshots are the hub's, governed by the hub settings the engine checked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraserve.contract import AdapterError
from loraserve.lora.policy import looks_like_hub_id
from loraserve.plugins.loader_peft.config import CONFIG_NAME, read_json

if TYPE_CHECKING:
    from loraserve.lora.policy import AdapterSourcePolicy

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_TOKENIZER_FILES = ("added_tokens.json", "tokenizer.json", "tokenizer_config.json")
#: every file this plugin may open in an adapter directory
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, *_TOKENIZER_FILES)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_directory(source: str, *, config_only: bool = False, policy: AdapterSourcePolicy | None = None) -> Path:
    """The local directory holding the adapter's files, downloading a hub id when needed; a local one is
    first :func:`confine`-d by ``policy``."""
    if not isinstance(source, str) or not source.strip():
        raise AdapterError(f"adapter source {source!r} is empty; pass a PEFT adapter directory or a hub id (org/name)")
    path = Path(source).expanduser()
    if policy is not None and not looks_like_hub_id(source):
        policy.check_file(path, "adapter source")
    if path.is_dir():
        if policy is not None:
            confine(path, policy)
        return path
    if path.exists():
        raise AdapterError(
            f"adapter source {source!r} is a file; pass the directory that holds {CONFIG_NAME} and {SAFETENSORS_NAME}"
        )
    if not looks_like_hub_id(source):
        raise AdapterError(
            f"adapter source {source!r} does not exist and is not a Hugging Face hub id (org/name); "
            f"pass a directory that holds {CONFIG_NAME}"
        )
    patterns = [CONFIG_NAME] if config_only else [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, *_TOKENIZER_FILES]
    return _download(source, patterns)


def confine(directory: Path, policy: AdapterSourcePolicy) -> None:
    """Refuse (``AdapterRefused``) an adapter directory any of whose :data:`ADAPTER_FILES` resolves
    outside ``--lora-allowed-dirs``, before any of them is read."""
    policy.check_file(directory, "adapter directory")
    for name in ADAPTER_FILES:
        path = directory / name
        if os.path.lexists(path):  # a dangling link may still lead out: refuse it too
            policy.check_file(path)


def _download(repo_id: str, patterns: list[str]) -> Path:
    # Read the offline switches now: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # network, auth, missing repo, missing cache: all mean "not fetched"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = (
            "HF_HUB_OFFLINE is set, so only the local hub cache was searched and it does not hold it"
            if offline
            else "the hub could not be reached or does not serve it"
        )
        raise AdapterError(
            f"adapter {repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({where}; {type(exc).__name__}: {reason}); pass a local directory that holds {CONFIG_NAME} "
            "instead"
        ) from exc


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of the adapter's weights file (CPU) and the file's path."""
    st, bn = directory / SAFETENSORS_NAME, directory / BIN_NAME
    if st.is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st), device="cpu")
        except Exception as exc:
            raise AdapterError(
                f"{st} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                "re-save the adapter with save_pretrained()"
            ) from None
        return tensors, st
    if bn.is_file():
        try:
            tensors = torch.load(str(bn), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(
                f"{bn} cannot be read with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {exc}); re-save the adapter as safetensors"
            ) from None
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise AdapterError(
                f"{bn} must hold a dict of tensor names to tensors; re-save the adapter with save_pretrained()"
            )
        return tensors, bn
    raise AdapterError(
        f"{directory} holds neither {SAFETENSORS_NAME} nor {BIN_NAME}; pass the directory "
        "save_pretrained() wrote the adapter weights to"
    )


def check_vocabulary(directory: Path, vocab_size: int) -> None:
    """Refuse an adapter whose tokenizer files define token ids beyond the base vocabulary."""
    for name in _TOKENIZER_FILES:
        path = directory / name
        if not path.is_file():
            continue
        data = read_json(path, "")
        ids = _token_ids(name, data)
        beyond = sorted(((i, t) for t, i in ids if i >= vocab_size), key=lambda it: it[0])
        if beyond:
            first_id, first_tok = beyond[0]
            raise AdapterError(
                f"{path} adds {len(beyond)} token(s) beyond the base model's vocabulary of {vocab_size} "
                f"(e.g. {first_tok!r} with id {first_id}); adapters with added tokens are not supported: "
                "retrain without adding tokens, or merge the adapter into a resized base model"
            )


def _token_ids(name: str, data: dict) -> list[tuple[str, int]]:
    """(token, id) pairs a tokenizer file defines; unknown layouts yield nothing."""
    pairs: list[tuple[str, int]] = []
    if name == "added_tokens.json":
        pairs = [(t, i) for t, i in data.items() if isinstance(i, int)]
    elif name == "tokenizer.json":
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            pairs = [(t, i) for t, i in vocab.items() if isinstance(i, int)]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
            pairs = [(str(v[0]) if isinstance(v, list) and v else "?", i) for i, v in enumerate(vocab)]
        for tok in data.get("added_tokens") or []:
            if isinstance(tok, dict) and isinstance(tok.get("id"), int):
                pairs.append((str(tok.get("content")), tok["id"]))
    elif name == "tokenizer_config.json":
        for key, tok in (data.get("added_tokens_decoder") or {}).items():
            if str(key).isdigit():
                pairs.append((str(tok.get("content") if isinstance(tok, dict) else tok), int(key)))
    return pairs
