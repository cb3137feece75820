"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) with fused, LoRA-aware projections.

The model runs one flat batch of tokens from many sequences: ``forward(input_ids[T], positions[T],
attn)``. It owns no attention cache: each layer applies RoPE and hands q/k/v to
``attn.attention(layer_idx, q, k, v)``, which the engine implements over its paged cache (and which
knows where each sequence starts). q/k/v share one ``qkv_proj`` and gate/up one ``gate_up_proj``,
so a LoRA backend sees one base output per fused projection with ``output_offsets`` marking the
slices (the layers are in :mod:`loraserve.models.llama_layers`). :meth:`LlamaForCausalLM.load_weights`
takes Hugging Face tensor names and fuses them.
Layers pass the residual stream beside the hidden states, so each residual add fuses into the next
RMSNorm; with RoPE and SiLU-and-mul these run as Triton kernels where
:func:`~loraserve.models.fused.use_fused` says so (``LORASERVE_FUSED_OPS=0`` keeps the eager code).
o_proj, down_proj and (with SiLU) gate_up_proj are marked ``lora_defer``: when the LoRA backend
leaves their expand to the consumer, the model takes it from the layer (``take_epilogue``) and hands
it to the next RMSNorm or to SiLU-and-mul.
Given a :class:`~loraserve.distributed.TensorParallel` of N ranks, one process per rank builds its
shard (Megatron-style): qkv_proj and gate_up_proj column-parallel (1/N of the heads, of the kv
heads and of the intermediate size), o_proj and down_proj row-parallel with an all-reduce,
embed_tokens and lm_head vocab-parallel, and every rank gets the whole logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from loraserve.distributed import TensorParallel
from loraserve.errors import ConfigError
from loraserve.lora.targets import FUSED_MODULES, FUSED_SLICE
from loraserve.models.dtypes import to_torch_device, to_torch_dtype
from loraserve.models.layers import LoRALinear
from loraserve.models.llama_layers import AttentionContext, LlamaModel

LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# Hugging Face projection name -> (our fused projection, slice index)
_FUSED = {hf: slot for hf, slot in FUSED_SLICE.items() if len(FUSED_MODULES[slot[0]]) > 1}
_UNFUSED = {fused: [hf for hf, (f, _) in _FUSED.items() if f == fused] for fused in ("qkv_proj", "gate_up_proj")}


def _required(config, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json field {name!r} is {value!r}; it must be a positive integer")
    return value


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM built from a transformers config.

    :param config: a ``transformers`` config (LlamaConfig, MistralConfig, Qwen2Config, ...).
    :param dtype: parameter dtype (``torch.dtype`` or a name such as ``"bfloat16"``).
    :param device: where parameters are created (``torch.device`` or a string); they start empty.
    :param tp: this process's place in a tensor-parallel group (None: one rank, the whole model).

    ``num_heads``, ``num_kv_heads``, ``q_size``, ``kv_size`` and ``intermediate_size`` are this
    rank's (the KV cache and attention size themselves by them); ``total_num_heads``,
    ``total_num_kv_heads`` and ``total_intermediate_size`` are the model's. ``vocab_size`` and
    ``hidden_size`` are the model's: :meth:`compute_logits` returns the whole vocabulary.
    A size the tensor-parallel size does not divide raises :class:`ConfigError` naming it.
    """

    def __init__(
        self,
        config,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None else TensorParallel()
        self.device = to_torch_device(device)
        self.dtype = to_torch_dtype(dtype, self.device)
        self.num_layers = _required(config, "num_hidden_layers")
        self.hidden_size = _required(config, "hidden_size")
        self.total_num_heads = _required(config, "num_attention_heads")
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.total_intermediate_size = _required(config, "intermediate_size")
        self.vocab_size = _required(config, "vocab_size")
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.total_num_heads
        if self.total_num_heads % self.total_num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.total_num_heads}) must be a multiple of num_key_value_heads "
                f"({self.total_num_kv_heads}) in config.json"
            )
        # every rank holds whole heads (GQA groups stay on one rank) and equal slices of the rest
        self.num_heads = self.tp.shard_size(self.total_num_heads, "num_attention_heads")
        self.num_kv_heads = self.tp.shard_size(self.total_num_kv_heads, "num_key_value_heads")
        self.intermediate_size = self.tp.shard_size(self.total_intermediate_size, "intermediate_size")
        self.tp.shard_size(self.vocab_size, "vocab_size")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.attention_scale = self.head_dim**-0.5
        self.layer_sliding_windows = _sliding_windows(config, self.num_layers)
        windows = {w for w in self.layer_sliding_windows if w is not None}
        self.sliding_window: int | None = max(windows) if windows else None
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))

        if getattr(config, "model_type", None) == "qwen2":  # Qwen2: biased q/k/v, unbiased o_proj
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        self.model = LlamaModel(self, qkv_bias, o_bias)
        self.lm_head = LoRALinear(
            self.hidden_size,
            [self.vocab_size],
            False,
            self.dtype,
            self.device,
            parallel="column",
            tp=self.tp,
            name="lm_head",
        )
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- forward --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden]`` of a flat token batch."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                "must both be flat [T] tensors of the same length"
            )
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, hidden.dtype)
        residual, lora = None, None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, cos, sin, attn, residual, lora)
            lora = layer.mlp.down_proj.take_epilogue()  # added by the next norm
        return self.model.norm(hidden, residual, lora=lora)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[N, vocab]`` for hidden states ``[N, hidden]`` (usually each sequence's last);
        under tensor parallelism every rank gets the whole vocabulary's."""
        return self.tp.all_gather(self.lm_head(hidden), dim=-1).float()

    def lora_targets(self) -> Iterator[tuple[int, str, LoRALinear]]:
        """``(layer_idx, name, module)`` for every LoRA-wrappable projection, layer by layer."""
        for i, layer in enumerate(self.model.layers):
            yield i, "qkv_proj", layer.self_attn.qkv_proj
            yield i, "o_proj", layer.self_attn.o_proj
            yield i, "gate_up_proj", layer.mlp.gate_up_proj
            yield i, "down_proj", layer.mlp.down_proj

    # -- weights --------------------------------------------------------------------------------

    def checkpoint_names(self) -> list[str]:
        """The Hugging Face tensor names a complete checkpoint provides for this model."""
        names = []
        for name, _ in self.named_parameters():  # the tied lm_head is listed once, as embed_tokens
            module_path, _, kind = name.rpartition(".")
            prefix, _, proj = module_path.rpartition(".")
            if proj in _UNFUSED:
                names.extend(f"{prefix}.{hf}.{kind}" for hf in _UNFUSED[proj])
            else:
                names.append(name)
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters, converting dtype and device.

        Raises :class:`ConfigError` naming the tensor on a shape mismatch or an unknown name, and
        at the end listing every parameter the checkpoint did not provide.
        """
        loaded: set[str] = set()
        unexpected: list[str] = []
        lm_head_as_embedding = False
        for name, tensor in weights:
            if "rotary_emb." in name:  # inv_freq buffers some checkpoints carry; we compute our own
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                # a tied checkpoint may store the shared matrix under either name; embed_tokens wins
                if "model.embed_tokens.weight" not in loaded:
                    embed = self.model.embed_tokens
                    self._copy(name, embed, embed.weight, "weight", None, tensor)
                    lm_head_as_embedding = True
                continue
            target = self._locate(name)
            if target is None:
                unexpected.append(name)
                continue
            self._copy(name, *target, tensor)
            loaded.add(name)
        if lm_head_as_embedding:
            loaded.add("model.embed_tokens.weight")
        missing = [n for n in self.checkpoint_names() if n not in loaded]
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensor(s): {_listing(missing)}")
        if unexpected:
            problems.append(
                f"{len(unexpected)} tensor(s) this {type(self).__name__} has no place for: {_listing(unexpected)}"
            )
        if problems:
            raise ConfigError(
                f"checkpoint does not match the model config ({getattr(self.config, 'model_type', '?')}, "
                f"{self.num_layers} layers): "
                + "; ".join(problems)
                + ". Check that config.json belongs to these weights"
            )

    def _locate(self, name: str) -> tuple[nn.Module, nn.Parameter, str, int | None] | None:
        """The module, parameter, kind (weight/bias) and fused slice index a Hugging Face tensor
        fills, or None if it has no place."""
        module_path, _, kind = name.rpartition(".")
        prefix, _, proj = module_path.rpartition(".")
        shard = None
        if proj in _FUSED:
            proj, shard = _FUSED[proj]
        try:
            module = self.get_submodule(f"{prefix}.{proj}" if prefix else proj)
        except AttributeError:
            return None
        param = getattr(module, kind, None) if kind in ("weight", "bias") else None
        if not isinstance(param, nn.Parameter):
            return None
        if shard is None and isinstance(module, LoRALinear) and len(module.output_sizes) > 1:
            return None  # a fused name in the checkpoint: we only accept the unfused Hugging Face names
        return module, param, kind, shard

    def _copy(
        self, name: str, module: nn.Module, param: nn.Parameter, kind: str, slice_idx: int | None, tensor: torch.Tensor
    ) -> None:
        """Check a full checkpoint tensor's shape and copy this rank's part of it into ``param``."""
        sharded = hasattr(module, "shard_of")
        expected = module.full_shape(kind, slice_idx) if sharded else tuple(param.shape)
        if tuple(tensor.shape) != expected:
            raise ConfigError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{expected} from config.json; check that the config matches the weights"
            )
        local = module.shard_of(tensor, kind, slice_idx) if sharded else tensor
        if slice_idx is None:
            param.data.copy_(local)
        else:
            param.data[module.output_offsets[slice_idx] : module.output_offsets[slice_idx + 1]].copy_(local)

    def full_parameter_shape(self, name: str) -> tuple[int, ...]:
        """The unsharded shape of parameter ``name`` (as ``named_parameters`` lists it)."""
        module, kind = self._owner(name)
        return module.full_shape(kind) if hasattr(module, "full_shape") else tuple(getattr(module, kind).shape)

    def shard_parameter(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of an unsharded tensor of :meth:`full_parameter_shape` for ``name``."""
        module, kind = self._owner(name)
        return module.shard_of(full, kind) if hasattr(module, "shard_of") else full

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        module_path, _, kind = name.rpartition(".")
        return self.get_submodule(module_path), kind


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _sliding_windows(config, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding attention window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not window:
        return (None,) * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (int(window),) * num_layers
