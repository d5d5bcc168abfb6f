"""Multi-head attention with swappable backends, shared by the UNet and the VAE.

One switch, `set_attention_backend(model, ...)`, picks the backend for every attention layer of a model:
- "sdpa": torch's scaled_dot_product_attention (fused kernels where the device has them); the default.
- "xformers": xformers' memory-efficient kernel (CUDA tensors only; install the `xformers` extra).
- "math": the textbook softmax(QK^T / sqrt(d)) V, for reference and for debugging.
`slice_size` (any backend) processes the queries in chunks of that many tokens: the score matrix never holds more
than slice_size x keys entries per head, at the cost of a Python loop.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "xformers", "math")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    slice_size: int | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Attention over (B, heads, tokens, head_dim) tensors; returns (B, heads, q_tokens, head_dim)."""
    if slice_size is not None and slice_size < q.shape[2]:
        chunks = q.split(slice_size, dim=2)
        return torch.cat([attention(chunk, k, v, backend, None, upcast) for chunk in chunks], dim=2)
    if backend == "sdpa":
        if upcast and q.dtype in (torch.float16, torch.bfloat16):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        import xformers.ops

        # xformers wants (B, tokens, heads, head_dim).
        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, heads, q_tokens, k_tokens)
        if upcast:
            scores = scores.float()
        return scores.softmax(dim=-1).to(v.dtype) @ v
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


class Attention(nn.Module):
    """Self-attention, or cross-attention to `context` tokens when `context_dim` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.upcast = upcast
        self.backend = "sdpa"
        self.slice_size: int | None = None
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list, so checkpoints name it `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._split_heads(proj(t)) for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = attention(q, k, v, self.backend, self.slice_size, self.upcast)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).flatten(2)  # (B, N, dim)
        return self.to_out[0](out)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = t.shape
        return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)  # (B, heads, N, head_dim)


def set_attention_backend(model: nn.Module, backend: str = "sdpa", slice_size: int | None = None) -> nn.Module:
    """Select the attention backend (and optional query slicing) for every attention layer in `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "xformers":
        _check_xformers(model)
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be a positive number of query tokens or None, got {slice_size}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
            module.slice_size = slice_size
    return model


def _check_xformers(model: nn.Module) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ValueError("attention backend 'xformers' needs the xformers package: pip install 'ldm[xformers]'")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cuda":
        raise ValueError("attention backend 'xformers' runs on CUDA only; move the model to a GPU or use 'sdpa'")
