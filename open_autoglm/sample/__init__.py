"""Token sampling: penalties, temperature, min-p / top-k / top-p, seeded exponential-race sampling."""

from open_autoglm.sample.sampler import LogprobsTensors, Sampler, SamplerOutput

__all__ = ["LogprobsTensors", "Sampler", "SamplerOutput"]
