"""GLM-4-0414: Llama-like, plus a norm after attention and after the MLP (before each residual
add), partial interleaved rotary (half of each head rotates), and gate/up fused in the checkpoint."""

from __future__ import annotations

from torch import nn

from open_autoglm.attention.base import BaseAttentionBackend
from open_autoglm.layers.norm import RMSNorm
from open_autoglm.layers.rotary import RotaryEmbedding
from open_autoglm.models.llama import MLP, Attention, LlamaForCausalLM


class Glm4DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, backend: BaseAttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, backend, rotary, qkv_bias=getattr(cfg, "attention_bias", True))
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, kv_caches, meta):
        attn = self.self_attn(positions, self.input_layernorm(x), kv_caches, meta)
        x = x + self.post_self_attn_layernorm(attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + self.post_mlp_layernorm(mlp)


class Glm4ForCausalLM(LlamaForCausalLM):
    # The checkpoint already stores gate_up_proj fused; q/k/v are separate.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    rotary_interleaved = True

    def make_layer(self, cfg, layer_idx: int, backend: BaseAttentionBackend) -> nn.Module:
        return Glm4DecoderLayer(cfg, layer_idx, backend, self.rotary)
