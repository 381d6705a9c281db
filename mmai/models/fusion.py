"""Fusion models: cross-attention (default), concat, early, late, FiLM, and the unimodal baselines.

All models share one call signature::

    model(image, image_present, clinical, clinical_mask) -> (B, n_outputs)
    model(image, image_present, clinical, clinical_mask, return_aux=True)
        -> ((B, n_outputs), {"image": (B, n_outputs), "clinical": (B, n_outputs), ...})

The auxiliary unimodal outputs (used by the trainer's auxiliary losses) are returned by the
forward itself, never kept on the module, so DistributedDataParallel sees every parameter used
in the graph it returns. Models without auxiliary heads return an empty dict.

    image          (B, C, D, H, W) float   zeros where the image is missing
    image_present  (B,) float              1 = image available, 0 = missing
    clinical       (B, F) float            preprocessed values (categoricals as level indices)
    clinical_mask  (B, F) float            1 = observed, 0 = missing

Base term (``base="glm"``, what the trainer builds by default, docs/models.md "The GLM base
term"): every model with a clinical path adds a frozen penalised GLM on the clinical features
(:class:`~mmai.models.glm.GLMTerm`, fitted on the training rows before training) to its output,
and the last layer of every deep term (clinical residual, fused residual, the direct image
term) starts at zero, so the freshly built model outputs exactly the GLM's linear predictor and
training must earn every change. ``base="none"`` builds the models without it (the layout of
runs made before the base term).

A missing image never reaches a head as zeros: each model swaps in a learned "missing image"
embedding (or masks the image tokens out of attention), so the prediction for a case without
an image is learned, not an artefact of blank voxels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmai.models.attention import CrossAttentionBlock
from mmai.models.glm import GLMTerm, check_base
from mmai.models.heads import Head
from mmai.models.image_encoders import ImageEncoder
from mmai.models.image_tokens import ImageToClinical, WindowTokenizer
from mmai.models.tabular import ClinicalMLP, FeatureTokenizer, build_clinical_encoder


def grid_coords(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Normalised voxel-centre coordinates of a (d, h, w) grid in [-1, 1]: (d*h*w, 3)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class FourierPosition(nn.Module):
    """Coordinates (N, 3) -> position embeddings (N, D) (size-agnostic, for sliding windows)."""

    def __init__(self, dim: int, n_freq: int = 4) -> None:
        super().__init__()
        self.freqs: torch.Tensor
        self.register_buffer("freqs", (2.0 ** torch.arange(n_freq)) * math.pi, persistent=False)
        self.proj = nn.Linear(3 * 2 * n_freq, dim)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        x = coords[..., None] * self.freqs  # (N, 3, n_freq)
        return self.proj(torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2))  # (N, D)


class MultimodalModel(nn.Module):
    """Base class; ``uses_image`` / ``uses_clinical`` tell the data pipeline what to load.

    ``glm``: the frozen GLM base term (:class:`~mmai.models.glm.GLMTerm`) or None.
    """

    uses_image = True
    uses_clinical = True

    def __init__(self) -> None:
        super().__init__()
        self.glm: GLMTerm | None = None

    def _init_base(self, base: str, feature_specs: Any, n_outputs: int) -> bool:
        """Build the GLM base term for ``base="glm"``; True when the model has one (its deep
        terms are then residuals whose last layer starts at zero)."""
        if check_base(base) == "glm":
            self.glm = GLMTerm(feature_specs, n_outputs)
        return self.glm is not None

    def _plus_base(self, out: torch.Tensor, clinical: torch.Tensor, clinical_mask: torch.Tensor) -> torch.Tensor:
        """``out`` (B, n_outputs) plus the GLM's linear predictor (unchanged without a base term)."""
        return out if self.glm is None else out + self.glm(clinical, clinical_mask)  # float32 under autocast too

    def forward(self, image: torch.Tensor | None, image_present: torch.Tensor, clinical: torch.Tensor | None,
                clinical_mask: torch.Tensor | None, *, return_aux: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def _with_aux(out: torch.Tensor, return_aux: bool, aux: dict[str, torch.Tensor] | None = None):  # noqa: ANN202
    """``out`` or ``(out, aux)`` as the caller asked (see the module docstring)."""
    return (out, aux or {}) if return_aux else out


def _fill_missing(vec: torch.Tensor, present: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """Rows with present == 0 take the learned ``missing`` vector. (B, D), (B,), (D,) -> (B, D)."""
    p = present.to(vec.dtype)[:, None]
    return vec * p + missing[None, :] * (1 - p)


def _key_padding(pad: torch.Tensor, absent: torch.Tensor) -> torch.Tensor | None:
    """The cross-attention's key-padding mask: ``pad`` (B, 1+N) when some case's image is absent
    (``absent`` (B,) bool) or while the model is traced, scripted, compiled or exported (one graph
    for every batch: ``mmai export``), else None. With no key masked, eager attention gives the same
    floats without the mask, and eager ``nn.MultiheadAttention`` checks a mask's shape with
    ``torch._check_with``, whose first call imports sympy (~0.8 CPU-s on predict's first case)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return pad
    return pad if bool(absent.any()) else None


class _PooledImage(nn.Module):
    """Encoder -> global average pool -> linear: (B, C, D, H, W) -> (B, dim), missing-aware."""

    def __init__(self, encoder: ImageEncoder, dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(encoder.num_features, dim), nn.GELU())
        self.missing = nn.Parameter(torch.zeros(dim))

    def forward(self, image: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return _fill_missing(self.proj(self.encoder(image)), present, self.missing)


class ImageOnly(MultimodalModel):
    """Image encoder -> pooled features -> head.

    With ``feature_specs`` (the image descriptors a run measures on each volume, never clinical
    columns; :mod:`mmai.data.focal`) and ``base="glm"``, the model is, like every fusion, a frozen
    GLM on those descriptors plus the CNN's head as a zero-initialised residual: it starts as the
    radiomics model and the CNN must earn its place. Without them it is the plain CNN."""

    uses_clinical = False

    def __init__(self, encoder: ImageEncoder, n_outputs: int, dim: int = 64, dropout: float = 0.1,
                 feature_specs: Any = None, base: str = "none", **_: object):
        super().__init__()
        residual = bool(feature_specs) and self._init_base(base, feature_specs, n_outputs)
        self.image = _PooledImage(encoder, dim)
        self.head = Head(dim, n_outputs, dropout, zero_init=residual)

    def forward(self, image, image_present, clinical=None, clinical_mask=None, *, return_aux=False):
        out = self.head(self.image(image, image_present))
        if self.glm is not None and clinical is not None and clinical_mask is not None:
            out = self._plus_base(out, clinical, clinical_mask)
        return _with_aux(out, return_aux)


class ClinicalOnly(MultimodalModel):
    """GLM base term + clinical encoder (``tokens``: feature tokens + [CLS] transformer; or
    ``mlp``) -> zero-initialised head (the residual)."""

    uses_image = False

    def __init__(self, feature_specs, n_outputs: int, dim: int = 64, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1, clinical_encoder: str = "tokens", base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.clinical = build_clinical_encoder(clinical_encoder, feature_specs, dim, heads, max(1, layers), dropout)
        self.head = Head(dim, n_outputs, dropout, zero_init=residual)

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False):
        out = self.head(self.clinical(clinical, clinical_mask))
        return _with_aux(self._plus_base(out, clinical, clinical_mask), return_aux)


class CrossAttentionFusion(MultimodalModel):
    """Clinical tokens (and a [CLS] token) query the image tokens; then self-attention mixes.

    1. image -> encoder feature map (B, C, d, h, w) -> N = d*h*w tokens (B, N, D) + position.
    2. keys = [missing-image token; image tokens]; image tokens are masked out where the image
       is missing, so absent images never contribute.
    3. queries = [CLS; clinical tokens] (B, 1+F, D) cross-attend to the keys.
    4. a transformer layer over [CLS; clinical tokens; mean image token]; the mean of its output
       tokens -> head (the average keeps a direct path from every clinical token and from the
       image, so the model trains as easily as concatenation and adds the interactions).
    5. output = clinical(x_clin) + residual(fused): ``clinical`` is a complete clinical-only
       model (the same encoder and head as :class:`ClinicalOnly`, built by
       ``model.clinical_encoder``), and the fused term's last layer starts at zero, so at
       initialisation the model *is* the clinical-only model and the image enters only as far
       as training finds it useful ("fusion that never hurts", docs/models.md).
    6. ``return_aux=True`` also returns, for the trainer's auxiliary losses: the clinical term
       alone (it stays a complete predictor by itself), an image-only head on the pooled image
       token, a head on the fusion's clinical tokens and a head on the fused vector alone. The
       last two train the fusion path as a full predictor (as the single-head design did), so
       the image branch learns as early as before although the clinical term already explains
       the clinical part of the outcome; the output reads the fused vector only through the
       zero-initialised residual head (measured in docs/models.md).
    """

    accepts_affine = True  # forward(..., affine=(B, 4, 4)) places window tokens in millimetres

    def __init__(self, encoder: ImageEncoder, feature_specs, n_outputs: int, dim: int = 64, heads: int = 4,
                 layers: int = 1, dropout: float = 0.1, windows: dict[str, Any] | None = None,
                 bidirectional: bool = False, clinical_encoder: str = "tokens", base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.encoder = encoder
        self.img_proj = nn.Linear(encoder.num_features, dim)
        self.pos = FourierPosition(dim)
        self.windows = WindowTokenizer(dim, **windows) if windows else None  # sliding windows, mm positions
        self.back = (nn.ModuleList([ImageToClinical(dim, heads, dropout) for _ in range(max(1, layers))])
                     if bidirectional else None)  # image tokens also attend to the clinical tokens
        self.no_image = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.tokenizer = FeatureTokenizer(feature_specs, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cross = nn.ModuleList([CrossAttentionBlock(dim, heads, dropout) for _ in range(max(1, layers))])
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.mix = nn.TransformerEncoder(layer, max(1, layers), enable_nested_tensor=False)
        self.head = Head(dim, n_outputs, dropout, zero_init=True)  # the fused (residual) term, 0 at init
        self.clinical = build_clinical_encoder(clinical_encoder, feature_specs, dim, heads, max(1, layers), dropout)
        self.clinical_head = Head(dim, n_outputs, dropout, zero_init=residual)
        # with a base term: a direct image term on the pooled image token, zero at initialisation
        self.image_term = Head(dim, n_outputs, dropout, zero_init=True) if residual else None
        self.aux_image = Head(dim, n_outputs, dropout)
        self.aux_tokens = Head(dim, n_outputs, dropout)  # on the fusion's own clinical tokens
        self.aux_fused = Head(dim, n_outputs, dropout)  # the fused vector alone, as a full predictor
        self.last_attention: torch.Tensor | None = None  # for explanations
        self.last_grid: tuple[int, int, int] | None = None

    def image_tokens(self, image: torch.Tensor, affine: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """(B, C_in, D, H, W) -> tokens (B, N, D) and the feature grid shape (d, h, w) or, with
        ``windows``, the :class:`~mmai.models.windows.WindowLayout` (positions in mm from ``affine``)."""
        if self.windows is not None:
            return self.windows(self.encoder, self.img_proj, image, affine)
        fmap = self.encoder.forward_features(image)  # (B, C, d, h, w)
        d, h, w = fmap.shape[2:]
        tok = self.img_proj(fmap.flatten(2).transpose(1, 2))  # (B, N, D)
        return tok + self.pos(grid_coords((d, h, w), image.device))[None], (d, h, w)

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False, affine=None):
        img_tok, self.last_grid = self.image_tokens(image, affine)  # (B, N, D), (d, h, w) or WindowLayout
        b, n, _ = img_tok.shape
        kv = torch.cat([self.no_image.expand(b, -1, -1), img_tok], dim=1)  # (B, 1+N, D)
        absent = image_present <= 0  # (B,)
        pad = torch.zeros(b, 1 + n, dtype=torch.bool, device=kv.device)
        pad[:, 1:] = absent[:, None]
        clin_tok = self.tokenizer(clinical, clinical_mask)  # (B, F, D)
        q = torch.cat([self.cls.expand(b, -1, -1), clin_tok], dim=1)  # (B, 1+F, D)
        weights = None
        for i, block in enumerate(self.cross):
            if self.back is not None:  # bidirectional: image tokens attend to [CLS; clinical] first
                img_tok = self.back[i](img_tok, q)  # (B, N, D)
                kv = torch.cat([kv[:, :1], img_tok], dim=1)  # (B, 1+N, D)
            q, weights = block(q, kv, _key_padding(pad, absent))
        self.last_attention = weights.detach() if weights is not None else None  # (B, 1+F, 1+N)
        present = (~absent).to(img_tok.dtype)[:, None, None]
        img_mean = (img_tok.mean(dim=1, keepdim=True) * present
                    + self.no_image.expand(b, -1, -1) * (1 - present))  # (B, 1, D)
        x = self.mix(torch.cat([q, img_mean], dim=1))  # (B, 2+F, D)
        pooled = (x.mean(dim=1), img_mean[:, 0], clin_tok.mean(dim=1))  # (B, D) each
        return self.combine(*pooled, clinical, clinical_mask, return_aux)

    def combine(self, fused: torch.Tensor, img_pooled: torch.Tensor, tok_pooled: torch.Tensor,
                clinical: torch.Tensor, clinical_mask: torch.Tensor, return_aux: bool = False):  # noqa: ANN201
        """clinical term + fused residual term (zero at initialisation) [+ direct image term].

        With a GLM base term the clinical term is ``GLM + clinical residual`` (the residual's
        last layer zero at initialisation) and a zero-initialised image term on ``img_pooled``
        is added too, so the model starts as the GLM and can reach an image-only model's fit
        through the image term alone.

        Args:
            fused: (B, D) pooled output tokens of the fusion.
            img_pooled: (B, D) mean image token (the learned no-image token where missing).
            tok_pooled: (B, D) mean of the fusion's clinical tokens (before cross-attention).
            clinical, clinical_mask: (B, F) as in :meth:`forward`.
        Returns:
            (B, n_outputs), or with ``return_aux`` ``(out, aux)``: aux ``clinical`` is the
            clinical term alone, ``image`` an image-only head, ``clinical_tokens`` a head on the
            fusion's clinical tokens, ``fused`` a head on the fused vector alone; (B, n_outputs) each.
        """
        base = self._plus_base(self.clinical_head(self.clinical(clinical, clinical_mask)), clinical,
                               clinical_mask)  # (B, n_outputs): [GLM +] clinical term
        out = base + self.head(fused)  # (B, n_outputs)
        if self.image_term is not None:
            out = out + self.image_term(img_pooled)
        if not return_aux:
            return out
        return out, {"image": self.aux_image(img_pooled), "clinical": base,
                     "clinical_tokens": self.aux_tokens(tok_pooled), "fused": self.aux_fused(fused)}


class ConcatFusion(MultimodalModel):
    """Pooled image vector || clinical MLP vector -> MLP -> head (intermediate fusion); with a
    base term: GLM + zero-initialised head + a zero-initialised direct image term."""

    def __init__(self, encoder: ImageEncoder, feature_specs, n_outputs: int, dim: int = 64, dropout: float = 0.1,
                 base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.image = _PooledImage(encoder, dim)
        self.clinical = ClinicalMLP(feature_specs, dim, dropout=dropout)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.head = Head(dim, n_outputs, dropout, zero_init=residual)
        self.image_term = Head(dim, n_outputs, dropout, zero_init=True) if residual else None

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False):
        img = self.image(image, image_present)  # (B, D)
        out = self.head(self.mlp(torch.cat([img, self.clinical(clinical, clinical_mask)], dim=1)))
        if self.image_term is not None:
            out = out + self.image_term(img)
        return _with_aux(self._plus_base(out, clinical, clinical_mask), return_aux)


class LateFusion(MultimodalModel):
    """One head per modality; outputs are summed (image term dropped where the image is missing).
    With a base term: GLM + both heads zero-initialised."""

    def __init__(self, encoder: ImageEncoder, feature_specs, n_outputs: int, dim: int = 64, dropout: float = 0.1,
                 base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.image = _PooledImage(encoder, dim)
        self.image_head = Head(dim, n_outputs, dropout, zero_init=residual)
        self.clinical = ClinicalMLP(feature_specs, dim, dropout=dropout)
        self.clinical_head = Head(dim, n_outputs, dropout, zero_init=residual)

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False):
        img = self.image_head(self.image(image, image_present)) * image_present.to(image.dtype)[:, None]
        out = img + self.clinical_head(self.clinical(clinical, clinical_mask))
        return _with_aux(self._plus_base(out, clinical, clinical_mask), return_aux)


class EarlyFusion(MultimodalModel):
    """Clinical values and masks broadcast as extra input channels of the image encoder.

    Input channels: the image (a learned constant intensity where the image is missing, so
    the voxels of a missing image never reach the encoder), an image-present channel, then the
    F clinical values (0 where missing) and the F clinical masks: ``C_in + 1 + 2F`` channels
    (:meth:`extra_channels`). With a base term: GLM + the zero-initialised head.
    """

    def __init__(self, encoder: ImageEncoder, feature_specs, n_outputs: int, dim: int = 64, dropout: float = 0.1,
                 base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.image = _PooledImage(encoder, dim)
        self.missing_value = nn.Parameter(torch.zeros(()))  # the learned intensity of a missing image
        self.head = Head(dim, n_outputs, dropout, zero_init=residual)

    @staticmethod
    def extra_channels(n_features: int) -> int:
        """Encoder input channels added to the image's: presence + values + masks."""
        return 1 + 2 * n_features

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False):
        b, _, d, h, w = image.shape
        p = (image_present > 0).to(image.dtype)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        img = torch.where(p > 0, image, self.missing_value.to(image.dtype))  # (B, C, D, H, W); absent: unused
        values = torch.where(clinical_mask > 0, clinical, torch.zeros_like(clinical))  # a missing value is 0, even NaN
        extra = torch.cat([values, clinical_mask], dim=1)  # (B, 2F)
        channels = [img, p.expand(b, 1, d, h, w), extra[:, :, None, None, None].expand(b, -1, d, h, w)]
        out = self.head(self.image(torch.cat(channels, dim=1), torch.ones_like(image_present)))
        return _with_aux(self._plus_base(out, clinical, clinical_mask), return_aux)


class FiLMFusion(MultimodalModel):
    """Clinical vector -> per-channel scale/shift of the image feature map (FiLM / DAFT-style).
    With a base term: GLM + the zero-initialised head (linear in the pooled image features, so
    it holds the direct image term)."""

    def __init__(self, encoder: ImageEncoder, feature_specs, n_outputs: int, dim: int = 64, dropout: float = 0.1,
                 base: str = "none", **_: object):
        super().__init__()
        residual = self._init_base(base, feature_specs, n_outputs)
        self.encoder = encoder
        self.clinical = ClinicalMLP(feature_specs, dim, dropout=dropout)
        self.film = nn.Linear(dim, 2 * encoder.num_features)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.proj = nn.Sequential(nn.Linear(encoder.num_features, dim), nn.GELU())
        self.missing = nn.Parameter(torch.zeros(dim))
        self.head = Head(2 * dim, n_outputs, dropout, zero_init=residual)

    def forward(self, image, image_present, clinical, clinical_mask, *, return_aux=False):
        c = self.clinical(clinical, clinical_mask)  # (B, D)
        gamma, beta = self.film(c).chunk(2, dim=1)  # (B, C) each
        fmap = self.encoder.forward_features(image)  # (B, C, d, h, w)
        fmap = fmap * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        img = _fill_missing(self.proj(fmap.mean(dim=(2, 3, 4))), image_present, self.missing)
        out = self.head(torch.cat([img, c], dim=1))
        return _with_aux(self._plus_base(out, clinical, clinical_mask), return_aux)
