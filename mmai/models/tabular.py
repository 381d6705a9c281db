"""Clinical encoders: a feature tokenizer (one token per clinical feature) and an MLP.

Both read the output of :class:`mmai.clinical.preprocess.ClinicalPreprocessor`:
``values`` (B, F) and ``mask`` (B, F) (1 = observed, 0 = missing), plus its
``feature_specs``. Where ``mask == 0`` the feature's token is a learned "missing" token, so
a model's output depends on a missing value only through its mask (whatever number sits in
``values``, NaN included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmai.clinical.preprocess import FeatureSpec
from mmai.errors import ConfigError


class FeatureTokenizer(nn.Module):
    """One ``dim``-vector per clinical feature (FT-Transformer style).

    numeric feature f: ``value * w_f + b_f``; categorical feature f: ``E_f[index] + b_f``
    (index 0 = unknown level); missing (mask 0): the learned token ``m_f``.

    Args:
        feature_specs: from ``ClinicalPreprocessor.feature_specs`` (F entries, in column order).
        dim: token width.

    Attributes:
        num_tokens: F, the number of tokens per case.
        dim: token width.
    """

    num_idx: Tensor
    cat_idx: Tensor
    inverse: Tensor
    cat_offset: Tensor
    cat_card: Tensor

    def __init__(self, feature_specs: Sequence[FeatureSpec], dim: int) -> None:
        super().__init__()
        specs = list(feature_specs)
        if not specs:
            raise ConfigError("FeatureTokenizer needs at least one clinical feature (the clinical: section is empty)")
        if dim < 1:
            raise ConfigError(f"FeatureTokenizer dim must be >= 1, got {dim}")
        for s in specs:
            if s.kind not in ("numeric", "categorical"):
                raise ConfigError(f"clinical feature {s.name!r} has kind {s.kind!r}; allowed: ['numeric', 'categorical']")
            if s.kind == "categorical" and s.cardinality < 1:
                raise ConfigError(f"categorical feature {s.name!r} needs cardinality >= 1, got {s.cardinality}")
        self.feature_specs = specs
        self.num_tokens = len(specs)
        self.dim = dim
        num_idx = [i for i, s in enumerate(specs) if s.kind == "numeric"]
        cat_idx = [i for i, s in enumerate(specs) if s.kind == "categorical"]
        cards = [specs[i].cardinality for i in cat_idx]
        order = num_idx + cat_idx
        inverse = [order.index(i) for i in range(len(specs))]
        self.register_buffer("num_idx", torch.tensor(num_idx, dtype=torch.long), persistent=False)
        self.register_buffer("cat_idx", torch.tensor(cat_idx, dtype=torch.long), persistent=False)
        self.register_buffer("inverse", torch.tensor(inverse, dtype=torch.long), persistent=False)
        offsets = [0] + list(torch.tensor(cards).cumsum(0)[:-1].tolist()) if cards else []
        self.register_buffer("cat_offset", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("cat_card", torch.tensor(cards, dtype=torch.long), persistent=False)
        bound = 1.0 / math.sqrt(dim)
        self.num_weight = nn.Parameter(torch.empty(len(num_idx), dim).uniform_(-bound, bound))
        self.num_bias = nn.Parameter(torch.empty(len(num_idx), dim).uniform_(-bound, bound))
        self.cat_embed = nn.Embedding(max(sum(cards), 1), dim)
        nn.init.uniform_(self.cat_embed.weight, -bound, bound)
        self.cat_bias = nn.Parameter(torch.empty(len(cat_idx), dim).uniform_(-bound, bound))
        self.missing = nn.Parameter(torch.empty(len(specs), dim).uniform_(-bound, bound))

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        """Tokens for a batch.

        Args:
            values: (B, F) float; numerics preprocessed, categoricals as index floats.
            mask: (B, F) float or bool; 1 = observed, 0 = missing.

        Returns:
            (B, F, dim) tokens.
        """
        observed = mask > 0.5                                              # (B, F)
        values = torch.where(observed, values, torch.zeros_like(values))   # drop missing (even NaN)
        parts = []
        if self.num_idx.numel():
            v = values[:, self.num_idx]                                    # (B, Fn)
            parts.append(v.unsqueeze(-1) * self.num_weight + self.num_bias)  # (B, Fn, dim)
        if self.cat_idx.numel():
            idx = values[:, self.cat_idx].round().long()                   # (B, Fc)
            idx = torch.where((idx >= 0) & (idx < self.cat_card), idx, torch.zeros_like(idx))
            parts.append(self.cat_embed(idx + self.cat_offset) + self.cat_bias)  # (B, Fc, dim)
        tokens = torch.cat(parts, dim=1)[:, self.inverse]                  # (B, F, dim)
        return torch.where(observed.unsqueeze(-1), tokens, self.missing.to(tokens.dtype))


class ClinicalMLP(nn.Module):
    """Clinical features -> one ``dim`` vector: small per-feature tokens, flattened, an MLP plus
    a linear skip path (so a linear model is easy to represent on small cohorts).

    Args:
        feature_specs: from ``ClinicalPreprocessor.feature_specs``.
        dim: output width.
        hidden: hidden width of the MLP.
        depth: number of hidden layers (>= 1).
        dropout: dropout after each hidden layer.
        token_dim: width of the per-feature tokens that are flattened.

    Attributes:
        dim: output width.
        num_tokens: 1 (the output is one vector per case).
    """

    def __init__(self, feature_specs: Sequence[FeatureSpec], dim: int, hidden: int = 128, depth: int = 2,
                 dropout: float = 0.1, token_dim: int = 8) -> None:
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ConfigError(f"ClinicalMLP needs depth >= 1 and hidden >= 1, got depth={depth}, hidden={hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"ClinicalMLP dropout must be in [0, 1), got {dropout}")
        self.tokenizer = FeatureTokenizer(feature_specs, token_dim)
        self.dim = dim
        self.num_tokens = 1
        flat = self.tokenizer.num_tokens * token_dim
        layers: list[nn.Module] = []
        width = flat
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*layers)
        self.skip = nn.Linear(flat, dim)

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        """Args: values (B, F), mask (B, F). Returns: (B, dim)."""
        flat = self.tokenizer(values, mask).flatten(1)                     # (B, F * token_dim)
        return self.mlp(flat) + self.skip(flat)                           # (B, dim)


class ClinicalTransformer(nn.Module):
    """FT-Transformer encoder: tokens + a [CLS] token -> self-attention -> the [CLS] output.

    The clinical-only model and the clinical path of the cross-attention fusion are both this
    encoder (see :func:`build_clinical_encoder`).

    Args:
        feature_specs: from ``ClinicalPreprocessor.feature_specs``.
        dim: token width (divisible by ``heads``).
        heads, layers, dropout: transformer settings (pre-norm, GELU, feed-forward width 2 * dim).

    Attributes:
        dim: output width. num_tokens: F (tokens before the [CLS] token is added).
    """

    def __init__(self, feature_specs: Sequence[FeatureSpec], dim: int, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"ClinicalTransformer dim ({dim}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ConfigError(f"ClinicalTransformer needs layers >= 1, got {layers}")
        self.tokenizer = FeatureTokenizer(feature_specs, dim)
        self.dim = dim
        self.num_tokens = self.tokenizer.num_tokens
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        """Args: values (B, F), mask (B, F). Returns: (B, dim)."""
        tokens = self.tokenizer(values, mask)                              # (B, F, dim)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)  # (B, 1 + F, dim) (shape: export-safe)
        return self.norm(self.encoder(x)[:, 0])                            # (B, dim)


CLINICAL_ENCODERS = ("tokens", "mlp")


def build_clinical_encoder(kind: str, feature_specs: Sequence[FeatureSpec], dim: int, heads: int = 4,
                           layers: int = 1, dropout: float = 0.1) -> ClinicalTransformer | ClinicalMLP:
    """The clinical encoder named by ``model.clinical_encoder``: ``tokens`` (:class:`ClinicalTransformer`)
    or ``mlp`` (:class:`ClinicalMLP`). Both map (values (B, F), mask (B, F)) -> (B, dim)."""
    if kind == "tokens":
        return ClinicalTransformer(feature_specs, dim, heads=heads, layers=layers, dropout=dropout)
    if kind == "mlp":
        return ClinicalMLP(feature_specs, dim, dropout=dropout)
    raise ConfigError(f"model.clinical_encoder = {kind!r} is not allowed; choose one of {list(CLINICAL_ENCODERS)}")
