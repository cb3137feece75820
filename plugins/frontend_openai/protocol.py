"""Request bodies of the OpenAI-compatible API and their translation into loraserve sampling parameters.

The bodies are strict: a field OpenAI does not define (and loraserve does not add) is refused with
the list of allowed fields, as OpenAI's own API refuses unrecognized arguments, and a value of the
wrong type ("0.5" for a number) is refused instead of coerced. Beyond OpenAI's fields, the SGLang
and vLLM extensions ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids`` and ``skip_special_tokens`` are accepted. Features loraserve does not have
(tools, JSON mode, logit bias, ``suffix``, ``best_of``) are refused with a message, never ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from loraserve.errors import UserError
from loraserve.http.errors import StrictModel
from loraserve.sched.sampling_params import MAX_TOP_LOGPROBS

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI name -> loraserve sampling parameter, for the fields that map one to one
PASSTHROUGH = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
}


# What the fields typed Any (validated by hand, for OpenAI-style messages) take, for the OpenAPI document
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1},
    ]
}
STOP_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "null"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "text"],
                "additionalProperties": False,
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
            },
        },
    ]
}


def _range(**bounds: Any) -> Any:
    """``json_schema_extra`` stating the range a field's value must lie in (``null`` stays allowed)."""

    def apply(schema: dict) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") != "null":
                option.update(bounds)

    return apply


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Sampling(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, json_schema_extra=_range(minimum=0))
    temperature: float | None = Field(None, json_schema_extra=_range(minimum=0))
    top_p: float | None = Field(None, json_schema_extra=_range(exclusiveMinimum=0, maximum=1))
    n: int | None = Field(None, json_schema_extra=_range(minimum=1))
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, json_schema_extra=STOP_SCHEMA)
    seed: int | None = Field(None, json_schema_extra=_range(minimum=0, maximum=2**64 - 1))
    presence_penalty: float | None = Field(None, json_schema_extra=_range(minimum=-2, maximum=2))
    frequency_penalty: float | None = Field(None, json_schema_extra=_range(minimum=-2, maximum=2))
    logit_bias: dict[str, Any] | None = Field(None, json_schema_extra=_range(maxProperties=0))  # refused
    user: str | None = None
    top_k: int | None = Field(None, json_schema_extra=_range(minimum=-1))
    min_p: float | None = Field(None, json_schema_extra=_range(minimum=0, maximum=1))
    repetition_penalty: float | None = Field(None, json_schema_extra=_range(exclusiveMinimum=0))
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, json_schema_extra=_range(items={"type": "integer", "minimum": 0}))
    skip_special_tokens: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError(f"must be a string or a list of strings, got {value!r}")

    @model_validator(mode="after")
    def _check_common(self) -> _Sampling:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported; remove it")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true; remove it or set stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> dict[str, Any]:
        """The loraserve sampling parameters these fields ask for (unset fields keep the defaults)."""
        return {
            ours: getattr(self, theirs) for theirs, ours in PASSTHROUGH.items() if getattr(self, theirs) is not None
        }


class CompletionRequest(_Sampling):
    prompt: Any = Field(json_schema_extra=PROMPT_SCHEMA)
    logprobs: int | None = Field(None, json_schema_extra=_range(minimum=0, maximum=MAX_TOP_LOGPROBS))
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = Field(None, json_schema_extra=_range(maxLength=0))  # insertion is refused

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported; remove it")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError(f"best_of={self.best_of} is not supported (only best_of equal to n); remove it")
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo together with logprobs needs prompt logprobs, which are not supported; drop one of them"
            )
        return self

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """``(text, None)`` or ``(None, token_ids)`` per prompt."""
        p = self.prompt

        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(p, str):
            return [(p, None)]
        if is_ids(p):
            return [(None, list(p))]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        if isinstance(p, list) and p and all(is_ids(x) for x in p):
            return [(None, list(x)) for x in p]
        raise UserError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
            f"token ids (none empty), got {str(p)[:80]!r}"
        )

    def sampling_params(self) -> dict[str, Any]:
        params = super().sampling_params()
        params["max_new_tokens"] = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        if self.logprobs is not None:
            params["return_logprob"] = True
            params["top_logprobs_num"] = self.logprobs
        return params


class ChatMessage(StrictModel):
    role: str = Field(json_schema_extra={"enum": list(CHAT_ROLES)})
    content: Any = Field(None, json_schema_extra=CONTENT_SCHEMA)
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in CHAT_ROLES:
            raise ValueError(f"unknown role {value!r}; use one of {', '.join(CHAT_ROLES)}")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(
                        f"content parts must be {{'type': 'text', 'text': ...}}; a {kind!r} part is not "
                        "supported (this server takes text only)"
                    )
                parts.append(part["text"])
            return "\n".join(parts)
        raise ValueError(f"content must be a string or a list of text parts, got {type(value).__name__}")

    def for_template(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, json_schema_extra=_range(minimum=0, maximum=MAX_TOP_LOGPROBS))
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra=_range(required=["type"], properties={"type": {"const": "text"}})
    )
    tools: list[Any] | None = Field(None, json_schema_extra=_range(maxItems=0))  # function calling is refused
    tool_choice: Any = Field(None, json_schema_extra={"enum": ["none", None]})

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if not self.messages:
            raise ValueError("messages is empty; send at least one message")
        if self.tools:
            raise ValueError("tools (function calling) are not supported; remove 'tools'")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported (tools are not); remove it")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError(
                f"response_format {self.response_format.get('type')!r} is not supported; only {{'type': 'text'}}"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true; set logprobs to true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_completion_tokens or max_tokens (deprecated), not both")
        return self

    def sampling_params(self) -> dict[str, Any]:
        params = super().sampling_params()
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None:
            params["max_new_tokens"] = limit
        if self.logprobs:
            params["return_logprob"] = True
            params["top_logprobs_num"] = self.top_logprobs or 0
        return params
