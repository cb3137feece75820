"""The OpenAPI schemas of the native API: the ``/generate`` body, its sampling parameters and answers.

``/generate`` is parsed by :func:`.routes.parse_generate` and
:meth:`loraserve.sched.sampling_params.SamplingParams.from_dict`, which give the messages clients see; these
models state the same types and ranges for the served document (``null`` for a sampling parameter
means its default, as SGLang accepts). Rules a schema cannot state (exactly one of ``text`` and
``input_ids``, lists aligned with the batch, token ids below the vocabulary size, the prompt plus
``max_new_tokens`` within the context) are checked by the parser with a 400. A test keeps the
sampling fields equal to :class:`~loraserve.sched.sampling_params.SamplingParams`'.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from loraserve.sched.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS

NonNegInt = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]


class SamplingParamsBody(BaseModel):
    """SGLang's sampling parameters; every one may be omitted or null (its default)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: NonNegInt | None = Field(None, description="Tokens to generate at most (default 128).")
    temperature: Annotated[float, Field(ge=0)] | None = Field(None, description="0 is greedy (default 1).")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = Field(None, description="-1 or 0 disable top-k.")
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    n: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Samples per input (--max-sequences-per-request bounds inputs x n)."
    )
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    return_logprob: bool | None = None
    top_logprobs_num: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class Component(BaseModel):
    """One adapter of a weighted composition (at most 8 distinct names, finite weights)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    weight: float


def _exactly_one(*fields: str) -> dict:
    """JSON Schema for "exactly one of ``fields`` is present and not null"."""
    return {"oneOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


class GenerateBody(BaseModel):
    """``POST /generate``: give ``text`` or ``input_ids`` (one prompt, or a list for a batch)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one("text", "input_ids"))

    text: str | Annotated[list[str], Field(min_length=1)] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1)] | None = None
    sampling_params: SamplingParamsBody | Annotated[list[SamplingParamsBody], Field(min_length=1)] | None = None
    lora_path: str | list[Component] | list[str | list[Component] | None] | None = Field(
        None,
        description="Adapter per input: a name, a weighted composition (a list of {name, weight}), or null "
        "(the base); one value for all inputs or a list with one per input.",
    )
    stream: bool = False
    return_logprob: bool | list[bool] | None = None
    top_logprobs_num: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] | None = None


class MetaInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="Prompt tokens found in the prefix cache (not computed again).")
    finish_reason: dict[str, Any] | None = None
    lora_path: str | None = None


class GenerateResult(BaseModel):
    """One result: the generated text, its token ids and ``meta_info``."""

    model_config = ConfigDict(extra="allow")

    text: str
    output_ids: list[int]
    meta_info: MetaInfo


GENERATE_OK = {
    "description": "One result for one input, a list for a batch; with stream=true, server-sent events "
    "of results so far, ending with 'data: [DONE]'.",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/GenerateResult"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/GenerateResult"}},
                ]
            }
        },
        "text/event-stream": {},
    },
}
