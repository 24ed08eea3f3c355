"""The RMSNorm of transformers' Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite: transformers
copies the class into each model's module): y = w ⊙ x̂, x̂ = x / √(mean(x²) + ε) computed in float32 and
cast back to the input's dtype, ε its ``variance_epsilon``. Valued as ``nn.RMSNorm`` is; registered by
import path, so valuing a model without it never imports transformers. (Gemma's RMSNorm scales by 1 + w
and is not among them: the start-up check would refuse it anyway.)"""

from __future__ import annotations

import torch

from .layer_norm import AffineNormKernel
from .registry import register

# transformers.models.<module> → the class name's prefix
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "granite": "Granite",
}


@register(*(f"transformers.models.{m}.modeling_{m}.{prefix}RMSNorm" for m, prefix in FAMILIES.items()))
class TransformersRMSNormKernel(AffineNormKernel):
    param_names = ("weight",)

    def shape(self, module):
        return tuple(module.weight.shape)

    def eps(self, module):
        return module.variance_epsilon

    def normalized(self, module, a):
        x = a.to(torch.float32)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        # the forward rounds x̂ to its input's dtype before scaling; ``a`` comes here in the contraction
        # dtype (float32 or wider), so round as the weight's dtype says (the model's, outside autocast)
        return x_hat.to(module.weight.dtype).to(a.dtype)
