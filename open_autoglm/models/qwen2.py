"""Qwen2: the Llama shape with a bias on the q/k/v projections."""

from open_autoglm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
