"""The layers of the Llama-family decoder (:mod:`loraserve.models.llama`): attention with one fused
``qkv_proj``, the MLP with one fused ``gate_up_proj``, the decoder layer that threads the residual
stream beside the hidden states, and the module tree (``model.embed_tokens``, ``model.layers``,
``model.norm``) whose parameter names match Hugging Face's. Each layer takes its sizes, dtype,
device and tensor-parallel group from the :class:`~loraserve.models.llama.LlamaForCausalLM` being
built; that class reads the config, runs the forward and loads the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from loraserve.contract import LoRAEpilogue
from loraserve.errors import ConfigError
from loraserve.models import fused
from loraserve.models.epilogue import apply_epilogue
from loraserve.models.layers import LoRAEmbedding, LoRALinear, RMSNorm, RotaryEmbedding, rotate_qk

if TYPE_CHECKING:
    from loraserve.models.llama import LlamaForCausalLM


class AttentionContext(Protocol):
    """What the model needs from the engine for one forward: attention over its cache."""

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, num_heads, head_dim]``, k/v ``[T, num_kv_heads, head_dim]`` -> ``[T, num_heads, head_dim]``."""


class LlamaAttention(nn.Module):
    def __init__(self, model: LlamaForCausalLM, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        dtype, device = model.dtype, model.device
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = model.num_heads, model.num_kv_heads, model.head_dim
        self.q_size, self.kv_size = model.q_size, model.kv_size  # this rank's
        q_full, kv_full = model.total_num_heads * self.head_dim, model.total_num_kv_heads * self.head_dim
        self.qkv_proj = LoRALinear(
            model.hidden_size,
            [q_full, kv_full, kv_full],
            qkv_bias,
            dtype,
            device,
            parallel="column",
            tp=model.tp,
            name="qkv_proj",
        )
        # the post-attention norm adds o_proj's LoRA delta (LlamaDecoderLayer.forward)
        self.o_proj = LoRALinear(
            q_full,
            [model.hidden_size],
            o_bias,
            dtype,
            device,
            parallel="row",
            tp=model.tp,
            name="o_proj",
            lora_defer=True,
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionContext
    ) -> torch.Tensor:
        T = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotate_qk(
            q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim), cos, sin
        )
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        out = attn.attention(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, model: LlamaForCausalLM, bias: bool, hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        if hidden_act not in ACT2FN:
            raise ConfigError(
                f"hidden_act {hidden_act!r} in config.json is not a known activation; "
                f"known: {', '.join(sorted(ACT2FN))}"
            )
        full = model.total_intermediate_size
        self.intermediate_size = model.intermediate_size  # this rank's
        self.act_fn = ACT2FN[hidden_act]
        self.is_silu = hidden_act in ("silu", "swish")  # both are F.silu in transformers
        # the consumers add these projections' LoRA deltas: SiLU-and-mul, and the next layer's norm
        self.gate_up_proj = LoRALinear(
            model.hidden_size,
            [full, full],
            bias,
            model.dtype,
            model.device,
            parallel="column",
            tp=model.tp,
            name="gate_up_proj",
            lora_defer=self.is_silu,
        )
        self.down_proj = LoRALinear(
            full,
            [model.hidden_size],
            bias,
            model.dtype,
            model.device,
            parallel="row",
            tp=model.tp,
            name="down_proj",
            lora_defer=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        lora = self.gate_up_proj.take_epilogue()  # only with SiLU (lora_defer)
        if self.is_silu and gate_up.stride(-1) == 1 and fused.use_fused(gate_up):
            return self.down_proj(fused.silu_and_mul(gate_up, self.intermediate_size, lora=lora))
        if lora is not None:
            gate_up = apply_epilogue(gate_up, lora)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, model: LlamaForCausalLM, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        cfg = model.config
        self.input_layernorm = RMSNorm(model.hidden_size, cfg.rms_norm_eps, model.dtype, model.device)
        self.self_attn = LlamaAttention(model, layer_idx, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(model.hidden_size, cfg.rms_norm_eps, model.dtype, model.device)
        self.mlp = LlamaMLP(model, bool(getattr(cfg, "mlp_bias", False)), getattr(cfg, "hidden_act", "silu"))

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionContext,
        residual: torch.Tensor | None = None,
        lora: LoRAEpilogue | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, residual)``: the residual stream is ``residual + hidden`` (or ``hidden`` alone
        for the first layer, whose input is the embedding); the next norm adds the MLP output to it.
        ``lora``: the previous layer's down_proj delta, left to this layer's first norm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden, lora=lora)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, lora=lora)
        hidden = self.self_attn(hidden, cos, sin, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual, lora=self.self_attn.o_proj.take_epilogue())
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, model: LlamaForCausalLM, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = LoRAEmbedding(model.vocab_size, model.hidden_size, model.dtype, model.device, tp=model.tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(model, i, qkv_bias, o_bias) for i in range(model.num_layers))
        self.norm = RMSNorm(model.hidden_size, model.config.rms_norm_eps, model.dtype, model.device)
        self.rotary_emb = RotaryEmbedding(model.config, model.head_dim, model.device)
