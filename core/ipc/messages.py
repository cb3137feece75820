"""What travels between the HTTP server's process (the front) and the engine process.

Two ZeroMQ PUSH/PULL pipes, one each way; every ZeroMQ message is one msgpack frame (msgspec),
so ZeroMQ does the framing and msgspec the typing. The front sends :data:`ToEngine` messages, one
per frame; the engine sends lists of :data:`FromEngine` messages, one list per frame (the outputs
of a step travel together). A frame that does not decode into these types is logged and dropped:
it never stops the engine.

Front -> engine:

- :class:`Submit` ``(call_id, requests)``: requests to queue atomically, each with prompt token ids
  (the front tokenizes), sampling parameters as SGLang's dict, the adapter name; answered by a
  :class:`Reply` (``value`` None, or the error that refused them).
- :class:`Abort` ``(request_ids)``: finish these requests with "abort" and free their KV blocks.
- :class:`Call` ``(call_id, method, args)``: one of :data:`RPC_METHODS` of the
  :class:`~loraserve.contract.EngineClient`; answered by a :class:`Reply`.
- :class:`Shutdown` ``(timeout)``: stop the engine (unfinished requests end with "abort"); the
  engine answers :class:`Stopped` and exits.

Engine -> front:

- :class:`Ready` ``(model_info)``: the engine is built (sent once, first).
- :class:`StartFailed` ``(error)``: building the engine failed (sent once, then the process exits).
- :class:`Delta` ``(request_id, token_ids, logprobs, top_logprobs, finished, finish_reason, matched,
  error, cached_tokens)``: token ids a request produced since its previous delta; no text (the front
  detokenizes and checks stop strings). ``matched`` is the stop token id or EOS id that ended it.
  ``cached_tokens`` (the prompt tokens the prefix cache held when it was first scheduled) rides on
  the first delta sent after it is known, and only there; fields at their default are not encoded.
- :class:`Reply` ``(call_id, value, error)``.
- :class:`Stopped`: the engine has shut down.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from loraserve import errors

#: the EngineClient methods the front may call in the engine process
RPC_METHODS = frozenset(
    {
        "loaded_adapters",
        "unloading_adapters",
        "is_servable",
        "check_adapter_updates",
        "load_adapter",
        "load_adapter_from_tensors",
        "unload_adapter",
        "flush_cache",
        "stats",
        "effective_settings",
    }
)


class ErrorInfo(msgspec.Struct):
    """An exception raised on the other side: its class name and message."""

    kind: str
    message: str


class NewRequest(msgspec.Struct):
    request_id: str
    input_ids: list[int]
    params: dict[str, Any]
    adapter: str | None = None


class Submit(msgspec.Struct, tag=True):
    call_id: int
    requests: list[NewRequest]


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Call(msgspec.Struct, tag=True):
    call_id: int
    method: str
    args: list[Any] = []


class Shutdown(msgspec.Struct, tag=True):
    timeout: float = 30.0


class Ready(msgspec.Struct, tag=True):
    model_info: dict[str, Any]


class StartFailed(msgspec.Struct, tag=True):
    error: ErrorInfo


class Delta(msgspec.Struct, tag=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finished: bool
    finish_reason: str | None = None
    matched: int | str | None = None
    error: str | None = None
    cached_tokens: int | None = None


class Reply(msgspec.Struct, tag=True):
    call_id: int
    value: Any = None
    error: ErrorInfo | None = None


class Stopped(msgspec.Struct, tag=True):
    pass


ToEngine = Union[Submit, Abort, Call, Shutdown]  # noqa: UP007 (msgspec reads the union at run time)
FromEngine = Union[Ready, StartFailed, Delta, Reply, Stopped]  # noqa: UP007


def error_info(exc: BaseException) -> ErrorInfo:
    return ErrorInfo(type(exc).__name__, str(exc))


def loraserve_error(info: ErrorInfo) -> errors.LoraserveError | None:
    """The loraserve error ``info`` describes, of the same class (so a NotFound stays a 404); None
    for any other exception (a bug)."""
    cls = getattr(errors, info.kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.LoraserveError):
        return cls(info.message)
    return None


def raise_error(info: ErrorInfo) -> None:
    """Raise the exception ``info`` describes: a loraserve error as itself, anything else as a
    RuntimeError naming the original class."""
    raise loraserve_error(info) or RuntimeError(f"{info.kind} in the engine process: {info.message}")


class Codec:
    """The encoders and decoders of one side (msgspec's are reusable and not shared between threads
    that encode at once, so each side keeps its own)."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.to_engine = msgspec.msgpack.Decoder(ToEngine)
        self.from_engine = msgspec.msgpack.Decoder(list[FromEngine])

    def encode(self, message: Any) -> bytes:
        return self.encoder.encode(message)
