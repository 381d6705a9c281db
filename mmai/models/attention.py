"""The cross-attention block shared by the fusion (clinical -> image) and its reverse direction."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Queries attend to a context (pre-norm), then a feed-forward layer, both residual.

    ``zero_init=True`` starts the attention output and the last feed-forward layer at zero, so the
    block is the identity until training moves it.
    """

    def __init__(self, dim: int, heads: int, dropout: float, *, zero_init: bool = False) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        if zero_init:
            last = self.ff[-1]
            for lin in (self.attn.out_proj, last):
                nn.init.zeros_(lin.weight)  # type: ignore[arg-type]
                nn.init.zeros_(lin.bias)  # type: ignore[arg-type]

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None = None, *,
                need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, Q, D) queries, (B, K, D) context -> updated queries (B, Q, D) and the attention
        weights (B, Q, K) averaged over heads (None with ``need_weights=False``)."""
        kv_n = self.norm_kv(kv)
        out, weights = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=kv_pad, need_weights=need_weights)
        q = q + out  # (B, Q, D)
        return q + self.ff(self.norm_ff(q)), weights
