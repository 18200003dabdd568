"""GLM-4-0414: Llama-like, plus a norm after attention and after the MLP (before each residual
add), partial interleaved rotary (half of each head rotates), and gate/up fused in the checkpoint."""

from __future__ import annotations

from torch import nn

from open_autoglm.attention.base import BaseAttentionBackend
from open_autoglm.layers.norm import RMSNorm
from open_autoglm.layers.rotary import RotaryEmbedding
from open_autoglm.models.llama import MLP, Attention, LlamaForCausalLM


class Glm4DecoderLayer(nn.Module):
    """Same split residual stream as LlamaDecoderLayer (input = x + residual); GLM-4's extra norms
    apply to each branch before it joins the residual:

        h   = input + post_self_attn_layernorm(attn(input_layernorm(input)))
        out = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))   <- returned as (branch, h)
    """

    def __init__(self, cfg, layer_idx: int, backend: BaseAttentionBackend, rotary: RotaryEmbedding,
                 fused: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, backend, rotary, qkv_bias=getattr(cfg, "attention_bias", True))
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(self, positions, x, residual, kv_caches, meta):
        x, residual = self.input_layernorm.forward_residual(x, residual)
        attn = self.self_attn(positions, x, kv_caches, meta)
        x, residual = self.post_attention_layernorm.forward_residual(self.post_self_attn_layernorm(attn), residual)
        return self.post_mlp_layernorm(self.mlp(x)), residual


class Glm4ForCausalLM(LlamaForCausalLM):
    # The checkpoint already stores gate_up_proj fused; q/k/v are separate.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    rotary_interleaved = True

    def make_layer(self, cfg, layer_idx: int, backend: BaseAttentionBackend) -> nn.Module:
        return Glm4DecoderLayer(cfg, layer_idx, backend, self.rotary, self.fused)
