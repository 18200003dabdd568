"""Llama (and the many models that share its shape): pre-norm decoder, GQA, SwiGLU MLP.

Attribute names mirror Hugging Face checkpoint keys; the only departures are the declared
fusions qkv_proj and gate_up_proj (see `packed_modules_mapping`).
"""

from __future__ import annotations

import torch
from torch import nn

from open_autoglm.attention.base import AttentionMetadata, BaseAttentionBackend
from open_autoglm.layers.activation import SiluAndMul
from open_autoglm.layers.linear import MergedLinear
from open_autoglm.layers.norm import RMSNorm
from open_autoglm.layers.rotary import RotaryEmbedding, hf_inv_freq


def gemv(*args, **kwargs):
    """layers/triton_gemv.gemv, imported on first use (it needs triton; CPU installs may lack it)."""
    from open_autoglm.layers.triton_gemv import gemv as triton_gemv

    return triton_gemv(*args, **kwargs)

KVCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: BaseAttentionBackend, rotary: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=o_bias)
        self.rotary = rotary
        self.backend = backend

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend_qkv(positions, self.qkv_proj(x), kv_caches, meta))

    def attend_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, kv_caches: list[KVCache],
                   meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) D] -> attention output [T, H D], before o_proj."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)     # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        k_cache, v_cache = kv_caches[self.layer_idx]
        if self.rotary.fused:  # one kernel rotates q, k and writes K, V; the backend only attends
            self.rotary.rotate_and_cache(positions, q, k, v, k_cache, v_cache, meta.slot_mapping)
            out = self.backend.attend(q, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        else:
            q, k = self.rotary(positions, q, k)
            out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return out.flatten(1)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, fused: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {0: intermediate_size, 1: intermediate_size}, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = SiluAndMul(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm layer over a split residual stream: the layer's input is x + residual (residual is
    None before the first layer), so each residual add fuses with the norm that follows it:

        residual = x + residual;  x = input_layernorm(residual)            (one fused op)
        x = self_attn(x)
        residual = x + residual;  x = post_attention_layernorm(residual)   (one fused op)
        return mlp(x), residual                      -> the next layer (or final norm) adds them
    """

    def __init__(self, cfg, layer_idx: int, backend: BaseAttentionBackend, rotary: RotaryEmbedding,
                 qkv_bias: bool, fused: bool = False) -> None:
        super().__init__()
        # Llama's attention_bias puts a bias on q, k, v and o; Qwen2 always has one on q, k, v only.
        attention_bias = getattr(cfg, "attention_bias", False)
        self.self_attn = Attention(cfg, layer_idx, backend, rotary, qkv_bias=qkv_bias or attention_bias,
                                   o_bias=attention_bias)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.decode_gemv = fused  # one-token steps through _forward_one_token (CUDA + triton only)

    def forward(self, positions, x, residual, kv_caches, meta) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decode_gemv and x.shape[0] == 1:
            return self._forward_one_token(positions, x, residual, kv_caches, meta)
        x, residual = self.input_layernorm.forward_residual(x, residual)
        x = self.self_attn(positions, x, kv_caches, meta)
        x, residual = self.post_attention_layernorm.forward_residual(x, residual)
        return self.mlp(x), residual

    def _forward_one_token(self, positions, x, residual, kv_caches, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """A step of one token (batch-1 decode): 7 kernels instead of 11; each norm and the SiLU·mul
        run as the prologue of the projection they feed (layers/triton_gemv.py), same roundings."""
        attn, mlp, ln1, ln2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        qkv, residual = gemv(x, attn.qkv_proj.weight, attn.qkv_proj.bias, "norm", residual, ln1.weight, ln1.eps)
        x, _ = gemv(attn.attend_qkv(positions, qkv, kv_caches, meta), attn.o_proj.weight, attn.o_proj.bias)
        gate_up, residual = gemv(x, mlp.gate_up_proj.weight, None, "norm", residual, ln2.weight, ln2.eps)
        return gemv(gate_up, mlp.down_proj.weight, None, "silu")[0], residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, layers: list[nn.Module], fused: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, kv_caches, meta)
        return self.norm.forward_residual(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint key part -> (our fused module, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False
    rotary_interleaved = False

    def __init__(self, cfg, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.config = cfg
        self.fused = uses_fused_ops(backend)
        self.rotary = make_rotary(cfg, interleaved=self.rotary_interleaved, fused=self.fused)
        layers = [self.make_layer(cfg, i, backend) for i in range(cfg.num_hidden_layers)]
        self.model = LlamaModel(cfg, layers, self.fused)
        self.decode_gemv = self.fused
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, cfg, layer_idx: int, backend: BaseAttentionBackend) -> nn.Module:
        return LlamaDecoderLayer(cfg, layer_idx, backend, self.rotary, qkv_bias=self.qkv_bias, fused=self.fused)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.decode_gemv and hidden.shape[0] == 1:
            return gemv(hidden, self.lm_head.weight)[0]
        return self.lm_head(hidden)

    def set_decode_gemv(self, on: bool) -> None:
        """Switch one-token steps between the fused Triton GEMVs and cuBLAS (benchmarks compare
        them; CUDA graphs captured before must be captured again)."""
        self.decode_gemv = on and self.fused
        for layer in self.model.layers:
            if hasattr(layer, "decode_gemv"):
                layer.decode_gemv = self.decode_gemv


def uses_fused_ops(backend: BaseAttentionBackend) -> bool:
    """The Triton attention backend means CUDA with triton: norms, rotary and SiLU·mul then run as
    fused Triton kernels too (layers/triton_ops.py). With the "torch" backend the whole model stays
    plain PyTorch: the reference the fast path is tested against."""
    return backend.name == "triton"


def make_rotary(cfg, interleaved: bool, fused: bool = False) -> RotaryEmbedding:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq, scaling = hf_inv_freq(cfg)
    return RotaryEmbedding(head_dim, inv_freq, cfg.max_position_embeddings, interleaved, scaling, fused)
