"""The RMSNorm of transformers' Llama family (Llama, Mistral, Qwen2, Qwen3): y = w ⊙ x̂, x̂ = x / √(mean(x²)
+ ε) computed in float32 and cast back to the input's dtype, ε its ``variance_epsilon``. Valued as
``nn.RMSNorm`` is; registered by import path, so valuing a model without it never imports transformers.
(Gemma's RMSNorm scales by 1 + w and is not among them: the start-up check would refuse it anyway.)"""

from __future__ import annotations

import torch

from .layer_norm import AffineNormKernel
from .registry import register

FAMILY = ("llama", "mistral", "qwen2", "qwen3")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


@register(*(f"transformers.models.{m}.modeling_{m}.{_CLASS_PREFIX[m]}RMSNorm" for m in FAMILY))
class TransformersRMSNormKernel(AffineNormKernel):
    param_names = ("weight",)

    def shape(self, module):
        return tuple(module.weight.shape)

    def eps(self, module):
        return module.variance_epsilon

    def normalized(self, module, a):
        x = a.to(torch.float32)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return x_hat.to(a.dtype)
