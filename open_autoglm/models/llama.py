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
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)     # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = kv_caches[self.layer_idx]
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {0: intermediate_size, 1: intermediate_size}, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: BaseAttentionBackend, rotary: RotaryEmbedding,
                 qkv_bias: bool) -> None:
        super().__init__()
        # Llama's attention_bias puts a bias on q, k, v and o; Qwen2 always has one on q, k, v only.
        attention_bias = getattr(cfg, "attention_bias", False)
        self.self_attn = Attention(cfg, layer_idx, backend, rotary, qkv_bias=qkv_bias or attention_bias,
                                   o_bias=attention_bias)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, kv_caches, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_caches, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(positions, x, kv_caches, meta)
        return self.norm(x)


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
        self.rotary = make_rotary(cfg, interleaved=self.rotary_interleaved)
        layers = [self.make_layer(cfg, i, backend) for i in range(cfg.num_hidden_layers)]
        self.model = LlamaModel(cfg, layers)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, cfg, layer_idx: int, backend: BaseAttentionBackend) -> nn.Module:
        return LlamaDecoderLayer(cfg, layer_idx, backend, self.rotary, qkv_bias=self.qkv_bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def make_rotary(cfg, interleaved: bool) -> RotaryEmbedding:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq, scaling = hf_inv_freq(cfg)
    return RotaryEmbedding(head_dim, inv_freq, cfg.max_position_embeddings, interleaved, scaling)
