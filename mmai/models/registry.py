"""``create_model(name, ...)``: one constructor for every fusion strategy (timm style)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.utils import look_up_option

from mmai.models import fusion as F
from mmai.models.fusion_names import FUSIONS
from mmai.models.image_encoders import create_encoder

MODELS: dict[str, type[F.MultimodalModel]] = {
    "cross_attention": F.CrossAttentionFusion,
    "concat": F.ConcatFusion,
    "early": F.EarlyFusion,
    "late": F.LateFusion,
    "film": F.FiLMFusion,
    "image_only": F.ImageOnly,
    "clinical_only": F.ClinicalOnly,
}
if tuple(MODELS) != FUSIONS:  # one list: mmai.models.fusion_names (CLI and config read it)
    raise ImportError(f"mmai.models.registry MODELS {list(MODELS)} disagree with fusion_names.FUSIONS {list(FUSIONS)}")


def list_models() -> list[str]:
    """Every fusion name, in :data:`mmai.models.fusion_names.FUSIONS` order."""
    return list(FUSIONS)


def create_model(name: str, *, n_outputs: int, feature_specs: Sequence[Any] = (), in_channels: int = 1,
                 encoder: str = "resnet", widths: Sequence[int] = (16, 32, 64, 128), dim: int = 64,
                 heads: int = 4, layers: int = 1, dropout: float = 0.1,
                 clinical_encoder: str = "tokens", windows: dict[str, Any] | None = None,
                 bidirectional: bool = False, base: str = "none", image_features: bool = False) -> F.MultimodalModel:
    """Build a fusion model.

    Args:
        name: one of :data:`MODELS` (``cross_attention``, ``concat``, ``early``, ``late``, ``film``,
            ``image_only``, ``clinical_only``).
        n_outputs: raw output width (see :func:`mmai.models.heads.n_outputs_for`).
        feature_specs: the clinical preprocessor's feature specs (one token per feature).
        in_channels: image channels C_in.
        encoder, widths: image encoder name and stage widths.
        dim, heads, layers, dropout: token width, attention heads, fusion depth, dropout.
        clinical_encoder: ``tokens`` (feature tokenizer + transformer) or ``mlp``: the encoder of
            ``clinical_only`` and of the clinical term of ``cross_attention``.
        windows: cross_attention only: sliding-window image tokens with millimetre positions
            (``roi_size``, ``overlap``, ``batch``, ``train_windows``, ``checkpoint``); None = one pass.
        bidirectional: cross_attention only: image tokens also attend to the clinical tokens.
        base: ``glm``: models with a clinical path get the frozen GLM base term
            (:mod:`mmai.models.glm`, zero until :func:`~mmai.models.glm.fit_base_term` fits it)
            and zero-initialised residual heads; ``none``: no base term. The trainer passes
            ``model.base`` (default ``glm``); the default here, ``none``, rebuilds runs saved
            before the base term existed.
        image_features: image_only only: ``feature_specs`` are image descriptors measured on the
            volume (mmai.data.focal); with ``base="glm"`` the model adds the GLM base term on them.
    """
    cls = look_up_option(name, MODELS)
    feature_specs = list(feature_specs)
    if cls.uses_clinical and not feature_specs:
        raise ValueError(f"model {name!r} needs clinical features, but the pipeline declares none "
                         "(add a clinical: section or use --fusion image_only)")
    kwargs: dict[str, Any] = dict(n_outputs=n_outputs, dim=dim, heads=heads, layers=layers, dropout=dropout)
    if cls.uses_clinical:
        kwargs["feature_specs"] = feature_specs
        kwargs["base"] = base
    if cls is F.ImageOnly and image_features and feature_specs:
        kwargs.update(feature_specs=feature_specs, base=base)
    if cls in (F.ClinicalOnly, F.CrossAttentionFusion):
        kwargs["clinical_encoder"] = clinical_encoder
    if cls is F.CrossAttentionFusion:
        kwargs.update(windows=windows, bidirectional=bidirectional)
    if cls.uses_image:
        extra = F.EarlyFusion.extra_channels(len(feature_specs)) if cls is F.EarlyFusion else 0
        kwargs["encoder"] = create_encoder(encoder, in_channels=in_channels + extra, widths=widths)
    return cls(**kwargs)
