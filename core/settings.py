"""Settings: the single source of every option, whether it comes from a flag, env var or default.

:class:`Settings` is a pydantic-settings class. Each field is one option: its name gives the CLI
flag (``max_loras_per_batch`` -> ``--max-loras-per-batch``) and the environment variable
(``LORASERVE_MAX_LORAS_PER_BATCH``), its default is the default, its description is the help text.
``loraserve.cli`` builds the argument parser from these fields; nothing else declares an option.
Flag names and defaults follow SGLang's server arguments.

Precedence: CLI flag > ``LORASERVE_*`` environment variable > default.
"""

# size: Settings is the one class of every option, so its ~260 lines of field declarations (the
# options themselves, with their help text) stay together; what an option's value may say lives
# elsewhere (--lora-paths entries in loraserve.lora.path_spec).
from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loraserve.errors import ConfigError, NotSupportedYet
from loraserve.lora.path_spec import LoRAPathSpec, check_lora_paths, parse_lora_paths
from loraserve.lora.policy import check_hub_entries
from loraserve.lora.targets import SUPPORTED_MODULES, expand_all


def _opt(description: str, group: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: help text, the --help group, and CLI extras (aliases, metavar)."""
    return {"description": description, "json_schema_extra": {"group": group, **extra}}


class Settings(BaseSettings):
    """Every loraserve option. Construct with keyword arguments (they win over the environment)."""

    model_config = SettingsConfigDict(
        env_prefix="LORASERVE_", extra="forbid", validate_default=True, validate_assignment=False
    )

    # -- model -----------------------------------------------------------------------------------
    model_path: str | None = Field(
        None,
        **_opt(
            "Hugging Face model directory, hub id or GGUF file (also the positional MODEL of 'loraserve serve MODEL'). "
            "Default: the embedded SmolLM2-135M-Instruct.",
            "model",
            aliases=["--model"],
        ),
    )
    tokenizer_path: str | None = Field(None, **_opt("Tokenizer directory or hub id (default: --model-path).", "model"))
    load_format: Literal["auto", "safetensors", "pt", "gguf", "dummy"] = Field(
        "auto",
        **_opt("How to read weights; 'dummy' makes random weights of the model's real shape (benchmarks).", "model"),
    )
    dtype: Literal["auto", "float32", "float", "bfloat16", "float16", "half"] = Field(
        "auto", **_opt("Compute dtype; 'auto' is float32 on CPU and bfloat16 on CUDA.", "model")
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", **_opt("Device; 'auto' picks cuda when a GPU is present.", "model")
    )
    served_model_name: str | None = Field(
        None, **_opt("Model name reported by the API (default: derived from --model-path).", "model")
    )
    context_length: int | None = Field(None, ge=1, **_opt("Maximum context length (default: the model's).", "model"))

    # -- server ----------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", **_opt("Address the HTTP server listens on.", "server"))
    port: int = Field(30000, ge=1, le=65535, **_opt("Port the HTTP server listens on.", "server"))
    api_key: str | None = Field(
        None, **_opt("Require 'Authorization: Bearer KEY' on every endpoint but /health.", "server")
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", **_opt("Logging level.", "server")
    )
    # bounds on what one client can make the server hold (body, sequences, queue, prompt) and the shutdown wait
    max_request_body_bytes: int = Field(
        32 * 2**20,
        ge=1,
        **_opt(
            "Largest HTTP request body in bytes; a larger one is refused with 413 before it is read in full "
            "(default 32 MiB).",
            "server",
        ),
    )
    max_sequences_per_request: int = Field(
        256,
        ge=1,
        **_opt(
            "Most sequences one HTTP request may ask for: inputs x n (a /generate batch, or OpenAI prompts x n); "
            "more is refused with 413, and an n above it with 400.",
            "server",
        ),
    )
    max_queued_requests: int = Field(
        4096,
        ge=1,
        **_opt(
            "Most requests waiting to be scheduled; a request that would queue beyond it is refused with 429 and "
            "Retry-After.",
            "server",
        ),
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        **_opt(
            "Longest text prompt in characters, refused with 413 before it is tokenized (default: 32 x the context "
            "length).",
            "server",
        ),
    )
    skip_server_warmup: bool = Field(
        False,
        **_opt(
            "Start without the warm-up steps that compile every Triton kernel variant a step can need before "
            "/health reports ready (CUDA only); the first steps of each new shape then compile them while serving.",
            "server",
        ),
    )
    shutdown_grace_period: float = Field(
        10.0,
        ge=0,
        **_opt(
            "Seconds in-flight requests may run on after SIGINT/SIGTERM before they are aborted (their clients get "
            "503).",
            "server",
        ),
    )

    engine_in_process: bool = Field(
        False,
        **_opt(
            "Run the engine loop in the HTTP server's process, on a thread (for debugging); by default it runs in "
            "a process of its own, so tokenizing, detokenizing and HTTP never take the interpreter lock from the "
            "scheduler.",
            "server",
            aliases=["--disable-frontend-multiprocessing"],
        ),
    )

    # -- scheduling and memory -------------------------------------------------------------------
    max_running_requests: int | None = Field(None, ge=1, **_opt("Most requests decoding at once.", "scheduling"))
    max_total_tokens: int | None = Field(
        None, ge=1, **_opt("KV-cache size in tokens (default: from the memory budget).", "scheduling")
    )
    mem_fraction_static: float | None = Field(
        None,
        gt=0,
        lt=1,
        **_opt(
            "Fraction of accelerator memory for weights, KV cache and LoRA slots (default: all the memory left "
            "after the largest step's activations, measured by a profile run at start-up, the CUDA graphs' "
            "estimate and a safety margin; the KV cache never takes more than that either way).",
            "scheduling",
        ),
    )
    chunked_prefill_size: int | None = Field(
        None, ge=1, **_opt("Longest prompt piece prefilled in one step.", "scheduling")
    )
    max_prefill_tokens: int = Field(16384, ge=1, **_opt("Token budget of one scheduler step.", "scheduling"))
    tp_size: int = Field(
        1,
        ge=1,
        **_opt(
            "Tensor-parallel degree: the model and every adapter split over this many GPUs (or CPU "
            "processes): the engine's process is rank 0 and starts the others.",
            "scheduling",
        ),
    )
    cuda_graph_max_bs: int | None = Field(
        None,
        ge=1,
        **_opt(
            "Largest decode batch captured in a CUDA graph (default: --max-running-requests, at most 256).",
            "scheduling",
        ),
    )
    disable_cuda_graph: bool = Field(False, **_opt("Do not capture decode steps in CUDA graphs.", "scheduling"))
    enable_dora_cuda_graph: bool = Field(
        False,
        **_opt(
            "Capture DoRA's per-output-feature scaling in the decode CUDA graphs, so decode steps with DoRA "
            "adapters replay graphs (default: such steps run eagerly, and steps without DoRA keep the fused "
            "LoRA epilogues; with this flag every captured step pays one scaling kernel per LoRA projection).",
            "lora",
        ),
    )
    disable_overlap_schedule: bool = Field(
        False,
        **_opt(
            "Run steps one after another: wait for each step's tokens before scheduling the next (default: the "
            "host prepares step N+1 while the GPU runs step N; with --tp-size > 1 the other ranks get each "
            "step's sampled tokens by a broadcast).",
            "scheduling",
        ),
    )
    disable_radix_cache: bool = Field(
        False,
        **_opt(
            "Do not reuse the KV cache of shared prompt prefixes (default: full blocks of earlier requests stay "
            "cached, keyed by their tokens and the adapter identity they were computed under, and are evicted "
            "least recently used first when the cache needs room; POST /flush_cache empties it).",
            "scheduling",
        ),
    )
    attention_backend: str | None = Field(
        None,
        **_opt(
            "Attention over the paged KV cache: Triton kernels, or PyTorch SDPA per sequence (default: the registered "
            "attention backend with the highest priority on the device: triton on CUDA, torch_native on CPU).",
            "scheduling",
        ),
    )
    random_seed: int | None = Field(None, **_opt("Seed for sampling without a per-request seed.", "scheduling"))

    # -- LoRA ------------------------------------------------------------------------------------
    enable_lora: bool | None = Field(None, **_opt("Serve LoRA adapters (implied by --lora-paths).", "lora"))
    lora_paths: Annotated[list[LoRAPathSpec] | None, NoDecode] = Field(
        None,
        **_opt(
            'Adapters to load at start-up, each PATH, NAME=PATH or JSON {"lora_name","lora_path","pinned"} '
            '(--lora-modules, vLLM\'s spelling, also takes {"name","path","base_model_name"}).',
            "lora",
            nargs="+",
            metavar="ADAPTER",
            aliases=["--lora-modules"],
        ),
    )
    max_loras_per_batch: int = Field(8, ge=1, **_opt("Adapter slots per batch; the base model counts as one.", "lora"))
    max_loaded_loras: int | None = Field(
        None,
        ge=1,
        **_opt(
            "Adapters kept in host memory (default: unbounded, or 2 x --max-loras-per-batch with overlap "
            "loading unless --max-loaded-lora-gib is given); at least --max-loras-per-batch.",
            "lora",
        ),
    )
    max_loaded_lora_gib: float | None = Field(
        None,
        gt=0,
        le=1e6,
        **_opt(
            "GiB of adapter weights kept in host memory (default: unbounded); with --max-loaded-loras, "
            "whichever bound is reached first evicts. An evicted adapter is read again from its source.",
            "lora",
        ),
    )
    lora_gpu_store_gib: float = Field(
        0.0,
        ge=0,
        le=1e6,
        **_opt(
            "GiB of GPU memory for adapters kept on the GPU beyond the batch's slots, in pages of 8 rank "
            "rows (memory proportional to each adapter's rank; a slot is then filled by a device copy). "
            "0: off, slots are filled from host memory.",
            "lora",
        ),
    )
    max_lora_rank: int | None = Field(
        None, ge=1, **_opt("Largest adapter rank (default: inferred from --lora-paths).", "lora")
    )
    lora_target_modules: Annotated[list[str] | None, NoDecode] = Field(
        None,
        **_opt(
            f"Modules adapters may target: names from {', '.join(SUPPORTED_MODULES)}, "
            "or 'all' for the seven projections (default: inferred from --lora-paths, else all).",
            "lora",
            nargs="+",
            metavar="MODULE",
        ),
    )
    lora_backend: str | None = Field(
        None,
        **_opt(
            "LoRA kernel backend (default: the registered backend with the highest priority on the device: csgmv on "
            "CUDA, torch on CPU, unless an installed plugin states a higher one).",
            "lora",
            aliases=["--backend"],
        ),
    )
    lora_eviction_policy: str = Field(
        "lru", **_opt("Which adapter to evict when a slot or the host cache is full.", "lora", aliases=["--eviction"])
    )
    enable_lora_overlap_loading: bool = Field(
        False,
        **_opt(
            "Copy adapter weights to the GPU on a side stream while the batch keeps decoding; host copies "
            "are page-locked and --max-loaded-loras is at most 2 x --max-loras-per-batch. No effect on CPU.",
            "lora",
        ),
    )
    # who decides what adapters may be loaded (see loraserve.lora.policy); the defaults are SGLang's
    lora_allowed_dirs: Annotated[list[str] | None, NoDecode] = Field(
        None,
        **_opt(
            "Load adapters only from inside these directories, for start-up --lora-paths and runtime loads alike: "
            "the adapter directory and every file read from it must resolve (symbolic links followed) inside one "
            "of them, else 403. Hub ids are governed by --lora-allow-hub instead. Default: any local directory "
            f"(LORASERVE_LORA_ALLOWED_DIRS separates them with {os.pathsep!r}).",
            "lora",
            nargs="+",
            metavar="DIR",
        ),
    )
    lora_allow_hub: bool = Field(
        False,
        **_opt(
            "Let runtime loads (/load_lora_adapter, adapter resolvers) fetch adapters named by a Hugging Face hub "
            "id (org/name); without it they are refused with 403. Start-up --lora-paths may always name hub ids.",
            "lora",
        ),
    )
    lora_allowed_hub_repos: Annotated[list[str] | None, NoDecode] = Field(
        None,
        **_opt(
            "Hub organisations (ORG) or repositories (ORG/REPO) runtime loads may fetch from without "
            "--lora-allow-hub; others are refused with 403.",
            "lora",
            nargs="+",
            metavar="ORG_OR_ORG/REPO",
        ),
    )
    disable_lora_runtime_updates: bool = Field(
        False,
        **_opt(
            "Refuse /load_lora_adapter, /load_lora_adapter_from_tensors and /unload_lora_adapter (and their /v1/ "
            "aliases) with 403 and consult no adapter resolver: only the start-up --lora-paths adapters are served.",
            "lora",
        ),
    )
    lora_unload_timeout: float = Field(
        30.0,
        ge=0,
        **_opt(
            "Seconds an HTTP unload waits for the adapter's in-flight requests; the name is hidden at once, and "
            "when requests still run after this the answer is 202 (pending) and the memory is freed when the last "
            "one finishes.",
            "lora",
            metavar="SECONDS",
        ),
    )

    # -- plugins ---------------------------------------------------------------------------------
    plugins: Annotated[list[str] | None, NoDecode] = Field(
        None,
        **_opt(
            "Load only these plugins (comma-separated in LORASERVE_PLUGINS); default: every installed one.",
            "plugins",
            nargs="+",
            metavar="NAME",
        ),
    )
    disable_plugin: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        **_opt("Do not load this plugin (repeatable).", "plugins", action="append", metavar="NAME"),
    )
    trace_plugins: bool = Field(False, **_opt("Log every plugin hook call (LORASERVE_TRACE_PLUGINS=1).", "plugins"))
    plugin_options: dict[str, Any] = Field(
        default_factory=dict,
        **_opt(
            'Values of plugins\' own options by name (e.g. {"max_lora_chunk_size": 32}); the command line fills it '
            "from the flags plugins declare, and the environment fills what it leaves out.",
            "plugins",
            cli=False,
        ),
    )

    # -- field parsing ---------------------------------------------------------------------------

    @field_validator("lora_paths", mode="before")
    @classmethod
    def _parse_lora_paths(cls, value: Any) -> Any:
        return parse_lora_paths(value)

    @field_validator("lora_target_modules", "plugins", "disable_plugin", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [n.strip() for item in value for n in str(item).split(",") if n.strip()]
        return value

    @field_validator("lora_target_modules")
    @classmethod
    def _check_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [m for m in value if m != "all" and m not in SUPPORTED_MODULES]
        if unknown:
            raise ValueError(
                f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(SUPPORTED_MODULES)} or 'all'"
            )
        return expand_all(value)

    @field_validator("lora_allowed_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment variable: separated as PATH is
            return [d for d in value.split(os.pathsep) if d.strip()]
        return value

    @field_validator("lora_allowed_hub_repos", mode="before")
    @classmethod
    def _check_hub_repos(cls, value: Any) -> Any:
        value = cls._split_names(value)
        return check_hub_entries(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.lora_paths:
            if self.enable_lora is False:
                raise ValueError(
                    "--lora-paths was given but LoRA is disabled (enable_lora=False); drop --lora-paths or enable LoRA"
                )
            check_lora_paths(self.lora_paths, self.max_loras_per_batch)
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ValueError(
                f"--max-loaded-loras ({self.max_loaded_loras}) must be at least "
                f"--max-loras-per-batch ({self.max_loras_per_batch})"
            )
        if (
            self.enable_lora_overlap_loading
            and self.max_loaded_loras is not None
            and self.max_loaded_loras > 2 * self.max_loras_per_batch
            and self.max_loaded_lora_gib is None
        ):
            raise ValueError(
                f"--enable-lora-overlap-loading keeps every host adapter copy in page-locked memory, "
                f"so --max-loaded-loras ({self.max_loaded_loras}) may be at most 2 x "
                f"--max-loras-per-batch = {2 * self.max_loras_per_batch} unless --max-loaded-lora-gib bounds "
                "its bytes; lower --max-loaded-loras, raise --max-loras-per-batch, give --max-loaded-lora-gib, "
                "or drop --enable-lora-overlap-loading"
            )
        return self

    # -- derived values --------------------------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        return bool(self.enable_lora or self.lora_paths)

    @property
    def host_cache_capacity(self) -> int | None:
        """Adapters the host cache holds: --max-loaded-loras, defaulting to 2 x --max-loras-per-batch
        with overlap loading (page-locked memory is not unbounded) unless --max-loaded-lora-gib bounds
        its bytes, and to no limit otherwise."""
        if self.max_loaded_loras is None and self.enable_lora_overlap_loading and self.max_loaded_lora_gib is None:
            return 2 * self.max_loras_per_batch
        return self.max_loaded_loras

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        aliases = {"float": "float32", "half": "float16"}
        if self.dtype != "auto":
            return aliases.get(self.dtype, self.dtype)
        return "bfloat16" if self.resolved_device() == "cuda" else "float32"

    def check_supported(self) -> None:
        """Refuse flags whose feature has not landed yet, instead of silently ignoring them."""
        for flag, given in NOT_SUPPORTED_YET.items():
            if given(self):
                raise NotSupportedYet(f"{flag} is not supported yet by this version of loraserve; remove it")


# flag -> predicate "the user asked for it". Entries leave this table as their features land.
NOT_SUPPORTED_YET: dict[str, Any] = {}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def describe_validation_error(exc: ValidationError, fields: Any) -> list[str]:
    """One line per error of ``exc``, naming the flag and environment variable of each field in ``fields``."""
    lines = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else ""
        where = f"{flag_name(field)} (env LORASERVE_{field.upper()})" if field in fields else "settings"
        msg = err.get("msg", "").removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, (dict, BaseModel)) or got is None else f" (got {got!r})"
        lines.append(f"{where}: {msg}{shown}")
    return lines


def make_settings(**values: Any) -> Settings:
    """Build :class:`Settings`, turning pydantic's errors into one ConfigError that names the flags."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        lines = describe_validation_error(exc, Settings.model_fields)
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
