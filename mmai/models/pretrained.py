"""``model.pretrained``: load image-encoder weights from a file or folder, report what arrived.

Accepted sources (never downloaded, never executed):

- a PyTorch state dict file (``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``, read with
  ``torch.load(weights_only=True)``) or a ``.safetensors`` file; the tensors may sit at the top
  level or under ``state_dict`` / ``model`` / ``net`` (also ``model_state_dict``, ``network``,
  ``weights``, nested), with or without DataParallel/DDP ``module.`` prefixes;
- a MedicalNet checkpoint (``{"state_dict": {"module.conv1.weight": ..., "module.layer1.0...":
  ...}}``): the same reader; its ResNet keys equal the MONAI ResNet's of the ``resnet10`` ..
  ``resnet50`` encoders (:mod:`mmai.models.image_encoders`), the segmentation head
  (``conv_seg``) is reported as unexpected;
- a MONAI bundle folder (``configs/``, ``models/model.pt`` or ``models/model.safetensors``):
  only the weights file is read; the bundle's configs are not instantiated, and a TorchScript
  ``models/model.ts`` is refused (loading TorchScript runs its code);
- the output folder of ``mmai pretrain`` (``encoder.safetensors`` + ``pretrain.json``), checked
  against the run's encoder name, widths and pipeline.

Keys are matched to the encoder by the one (checkpoint prefix -> encoder prefix) rewrite that
matches the most tensors, e.g. ``encoder.net.`` -> ``net.`` or ``""`` -> ``net.``. A matched
tensor of another shape is a :class:`~mmai.errors.CheckpointError` naming both shapes, except
the first convolution's input channels: a checkpoint with 1 input channel feeds a C-channel
pipeline by repeating its kernel (scaled 1/C), a C-channel one feeds a 1-channel pipeline by
summing; extra (early-fusion clinical) channels start at zero. Every adaptation is reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmai.errors import CheckpointError

log = logging.getLogger(__name__)

PRETRAIN_META = "pretrain.json"
PRETRAIN_WEIGHTS = "encoder.safetensors"
WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
SHOW = 20  # key names listed per category in reports


@dataclasses.dataclass
class LoadReport:
    """What a ``model.pretrained`` load did (logged and written to metrics.json)."""

    source: str
    format: str
    rewrite: tuple[str, str]
    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    adapted: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: counts, the key names (first :data:`SHOW` of each), adaptations."""
        return {"source": self.source, "format": self.format,
                "rewrite": {"checkpoint_prefix": self.rewrite[0], "encoder_prefix": self.rewrite[1]},
                "n_matched": len(self.matched), "n_missing": len(self.missing), "n_unexpected": len(self.unexpected),
                "missing": self.missing[:SHOW], "unexpected": self.unexpected[:SHOW],
                "matched": self.matched[:SHOW], "adapted": self.adapted, "notes": self.notes}

    def summary(self) -> str:
        text = (f"pretrained weights {self.source} ({self.format}): {len(self.matched)} encoder tensors loaded, "
                f"{len(self.missing)} missing (kept at initialisation), {len(self.unexpected)} unexpected (ignored)")
        if self.adapted:
            text += "; adapted: " + "; ".join(f"{k}: {v}" for k, v in self.adapted.items())
        return text


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(flat state dict without ``module.`` prefixes, format name, metadata) of a source.

    Raises:
        CheckpointError: not found, unreadable, executable-only, or without tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model.pretrained: {path} does not exist (a state dict file, a MONAI bundle "
                              f"folder or an `mmai pretrain` output folder; nothing is downloaded)")
    if path.is_dir():
        return _read_folder(path)
    raw = _read_file(path)
    tensors = _strip_module(_unwrap(raw, path))
    fmt = "medicalnet" if _looks_medicalnet(tensors) else ("safetensors" if path.suffix == ".safetensors"
                                                           else "state_dict")
    return tensors, fmt, {}


def _read_folder(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    if (path / PRETRAIN_META).exists():
        meta = _read_json(path / PRETRAIN_META)
        if meta.get("format") != "mmai-pretrain":
            raise CheckpointError(f"{path / PRETRAIN_META}: format {meta.get('format')!r}, expected 'mmai-pretrain'")
        return _strip_module(_read_file(path / PRETRAIN_WEIGHTS)), "mmai_pretrain", meta
    models = path / "models"
    if (path / "configs").is_dir() or models.is_dir():
        meta = _read_json(path / "configs" / "metadata.json") if (path / "configs" / "metadata.json").exists() else {}
        for name in ("model.safetensors", "model.pt", "model.pth"):
            if (models / name).exists():
                tensors = _strip_module(_unwrap(_read_file(models / name), models / name))
                info: dict[str, Any] = {k: meta[k] for k in ("name", "version") if k in meta}
                info["weights"] = f"models/{name}"
                return tensors, "monai_bundle", info
        if (models / "model.ts").exists():
            raise CheckpointError(f"{path}: the MONAI bundle holds only TorchScript weights (models/model.ts); mmai "
                                  "reads weights without running code: save the network's state_dict as "
                                  "models/model.pt (torch.save(net.state_dict(), ...)) and point model.pretrained at it")
        raise CheckpointError(f"{path}: a MONAI bundle folder needs models/model.pt or models/model.safetensors; "
                              f"found {sorted(p.name for p in models.iterdir()) if models.is_dir() else 'no models/'}")
    raise CheckpointError(f"{path}: a folder given as model.pretrained must be an `mmai pretrain` output "
                          f"({PRETRAIN_META} + {PRETRAIN_WEIGHTS}) or a MONAI bundle (configs/, models/model.pt)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"model.pretrained: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    if path.suffix in (".ts", ".zip") or path.name.endswith(".torchscript"):
        raise CheckpointError(f"{path}: TorchScript files run code when loaded; mmai reads weights only: "
                              "give a state dict (.pt/.pth) or .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle / zip / torch errors all mean "not a plain state dict"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict with torch.load(weights_only=True) "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); mmai never "
                              "unpickles code: re-save the weights with torch.save(model.state_dict(), path) or as "
                              f".safetensors; allowed files: {list(TORCH_SUFFIXES)} or .safetensors") from exc


def _unwrap(obj: Any, path: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    """The flat tensor mapping inside a loaded object (top level, or under a wrapper key)."""
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        if depth < 3:
            for key in WRAPPERS:
                if isinstance(obj.get(key), dict):
                    return _unwrap(obj[key], path, depth + 1)
        keys = list(obj)[:10]
        raise CheckpointError(f"{path}: no state dict found: top-level keys {keys}; expected tensors, or a "
                              f"mapping under one of {list(WRAPPERS[:3])}")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of tensors)")


def _strip_module(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel / DDP ``module.`` path components."""
    return {".".join(p for p in k.split(".") if p != "module"): v for k, v in tensors.items()}


def _looks_medicalnet(tensors: dict[str, torch.Tensor]) -> bool:
    conv1 = tensors.get("conv1.weight")
    return (conv1 is not None and conv1.dim() == 5 and tuple(conv1.shape[2:]) == (7, 7, 7)
            and "layer1.0.conv1.weight" in tensors)


# ----------------------------------------------------------------------------- matching


def _dot_prefixes(key: str) -> list[tuple[str, str]]:
    """Every split of ``key`` into (prefix ending in '.', rest), the empty prefix first."""
    parts = key.split(".")
    return [(".".join(parts[:i]) + ("." if i else ""), ".".join(parts[i:])) for i in range(len(parts))]


def best_rewrite(ckpt_keys: list[str], enc_keys: list[str]) -> tuple[str, str]:
    """The (checkpoint prefix, encoder prefix) rewrite matching the most keys (ties: shortest prefixes)."""
    by_rest: dict[str, list[str]] = {}
    for e in enc_keys:
        for pre, rest in _dot_prefixes(e):
            by_rest.setdefault(rest, []).append(pre)
    votes: Counter[tuple[str, str]] = Counter()
    for k in ckpt_keys:
        for pre, rest in _dot_prefixes(k):
            for epre in by_rest.get(rest, ()):
                votes[(pre, epre)] += 1
    if not votes:
        return ("", "")
    return max(votes, key=lambda pq: (votes[pq], -len(pq[0]) - len(pq[1])))


def first_conv_key(encoder: nn.Module) -> str | None:
    """The encoder's first 5-D weight (its stem convolution), in module order."""
    for name, p in encoder.named_parameters():
        if p.dim() == 5:
            return name
    return None


def _adapt_in_channels(key: str, src: torch.Tensor, dst: torch.Tensor, image_channels: int, source: str
                       ) -> tuple[torch.Tensor, str]:
    """A stem kernel (O, I_ckpt, k, k, k) made to fit (O, I_enc, k, k, k)."""
    c_src, c_enc = int(src.shape[1]), int(dst.shape[1])
    out = torch.zeros_like(dst)
    if c_src == image_channels:
        out[:, :c_src] = src
        how = "copied"
    elif c_src == 1:
        out[:, :image_channels] = src.repeat(1, image_channels, 1, 1, 1) / image_channels
        how = f"1-channel kernel repeated over {image_channels} channels, scaled 1/{image_channels}"
    elif image_channels == 1:
        out[:, :1] = src.sum(dim=1, keepdim=True)
        how = f"{c_src}-channel kernel summed into 1 channel"
    else:
        raise CheckpointError(f"{source}: {key!r} has {c_src} input channels, the pipeline gives {image_channels}; "
                              "mmai adapts 1 <-> C channels only: use a pipeline with the checkpoint's channels")
    extra = c_enc - image_channels
    if extra > 0:
        how += f"; {extra} extra input channel(s) (early fusion) start at zero"
    return out, f"in_channels {c_src} -> {c_enc}: {how}"


def load_into(encoder: nn.Module, tensors: dict[str, torch.Tensor], *, source: str, fmt: str,
              image_channels: int = 1) -> LoadReport:
    """Copy the matching ``tensors`` into ``encoder`` (in place); return the report.

    Raises:
        CheckpointError: no tensor matches, or a matched tensor has another shape (the key and
            both shapes named), or unadaptable input channels.
    """
    own = encoder.state_dict()
    ckpt_keys, enc_keys = list(tensors), list(own)
    pre, epre = best_rewrite(ckpt_keys, enc_keys)
    mapping = {k: epre + k[len(pre):] for k in ckpt_keys if k.startswith(pre) and epre + k[len(pre):] in own}
    if not mapping:
        raise CheckpointError(f"{source}: no tensor of the checkpoint matches the image encoder; checkpoint keys "
                              f"{ckpt_keys[:6]}..., encoder keys {enc_keys[:6]}...; check model.encoder (resnet, "
                              "resnet10/18/34/50, densenet)")
    stem = first_conv_key(encoder)
    adapted: dict[str, str] = {}
    new = dict(own)
    for k, e in mapping.items():
        src, dst = tensors[k], own[e]
        if tuple(src.shape) != tuple(dst.shape):
            if e == stem and src.dim() == 5 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
                src, adapted[e] = _adapt_in_channels(k, src, dst, image_channels, source)
            else:
                raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(src.shape)} in the checkpoint, but the "
                                      f"encoder's {e!r} has {tuple(dst.shape)}; model.encoder / model.widths must "
                                      "describe the checkpoint's network (MedicalNet: widths [64, 128, 256, 512])")
        new[e] = src.to(dtype=dst.dtype)
    encoder.load_state_dict(new)
    matched = sorted(mapping.values())
    missing = [e for e in enc_keys if e not in set(mapping.values())]
    unexpected = [k for k in ckpt_keys if k not in mapping]
    return LoadReport(source=source, format=fmt, rewrite=(pre, epre), matched=matched, missing=missing,
                      unexpected=unexpected, adapted=adapted)


def check_pretrain_meta(meta: dict[str, Any], *, encoder: str, widths: list[int], pipeline_id: str | None,
                        source: str) -> list[str]:
    """Refuse an ``mmai pretrain`` output of another encoder; return notes (e.g. another pipeline)."""
    if meta.get("encoder") != encoder or [int(w) for w in meta.get("widths", [])] != [int(w) for w in widths]:
        raise CheckpointError(f"{source}: pretrained encoder {meta.get('encoder')!r} widths {meta.get('widths')}, "
                              f"this run uses {encoder!r} widths {list(widths)}; set model.encoder / model.widths "
                              "to the pretraining's")
    notes = []
    if pipeline_id is not None and meta.get("pipeline_id") not in (None, pipeline_id):
        notes.append(f"pretrained on image pipeline {meta.get('pipeline_id')}, this run uses {pipeline_id}")
    return notes


# ----------------------------------------------------------------------------- model level


def resolve_source(path: str, config_source: str) -> Path:
    """``model.pretrained`` as given (absolute, or relative to the working directory), else
    relative to the pipeline YAML's folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = Path(config_source).parent / p
    return alt if alt.exists() else p


def image_encoder(model: nn.Module) -> nn.Module | None:
    """The model's image encoder (the first :class:`~mmai.models.image_encoders.ImageEncoder`), or None."""
    from mmai.models.image_encoders import ImageEncoder

    return next((m for m in model.modules() if isinstance(m, ImageEncoder)), None)


def apply_pretrained(model: nn.Module, config: Any) -> dict[str, Any] | None:
    """Load ``config.model.pretrained`` into the model's image encoder (None when unset); mark the
    loaded parameters (``model.pretrained_params``, names in ``model.named_parameters()``) for
    :func:`param_groups`, freeze them with ``model.freeze_pretrained: true``; log the report and
    return it as a dict (for metrics.json)."""
    mc = config.model
    if not mc.pretrained:
        return None
    encoder = image_encoder(model)
    if encoder is None:
        log.warning("model.pretrained is set, but fusion %s has no image encoder: not loaded", mc.fusion)
        return {"source": mc.pretrained, "skipped": f"fusion {mc.fusion} has no image encoder"}
    from mmai.transforms.pipelines import image_channels, image_pipeline_id

    path = resolve_source(mc.pretrained, config.source)
    notes: list[str] = []
    pid = image_pipeline_id(config.image) if config.image is not None else None
    if (path / PRETRAIN_META).is_file():  # compatibility first, then the weights
        notes = check_pretrain_meta(_read_json(path / PRETRAIN_META), encoder=mc.encoder, widths=list(mc.widths),
                                    pipeline_id=pid, source=str(path))
    tensors, fmt, meta = read_checkpoint(path)
    channels = image_channels(config.image) if config.image is not None else 1
    report = load_into(encoder, tensors, source=str(path), fmt=fmt, image_channels=channels)
    report.notes = notes + ([f"bundle {meta}"] if fmt == "monai_bundle" and meta else [])
    prefix = next(n for n, m in model.named_modules() if m is encoder)
    loaded = {f"{prefix}.{n}" for n, _ in encoder.named_parameters() if n in set(report.matched)}
    model.pretrained_params = frozenset(loaded)  # type: ignore[assignment]  # read by param_groups
    if mc.freeze_pretrained is True:
        for n, p in model.named_parameters():
            if n in loaded:
                p.requires_grad_(False)
    log.info("%s", report.summary())
    if report.missing:
        log.warning("pretrained weights: %d encoder tensors not in %s (kept at initialisation): %s",
                    len(report.missing), path, report.missing[:SHOW])
    for note in notes:
        log.warning("pretrained weights: %s", note)
    out = report.to_dict()
    out.update(lr_multiplier=mc.pretrained_lr, frozen=mc.freeze_pretrained)
    return out


def param_groups(model: nn.Module, lr: float, multiplier: float) -> list[dict[str, Any]]:
    """Optimizer groups: the other parameters at ``lr`` first, then the pretrained ones (see
    :func:`apply_pretrained`) at ``lr * multiplier`` (named ``pretrained``). Frozen parameters
    (``requires_grad`` false) are left out."""
    marked: frozenset[str] = getattr(model, "pretrained_params", frozenset())
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in marked]
    pre = [p for n, p in model.named_parameters() if p.requires_grad and n in marked]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr, "name": "default"}]
    if pre:
        groups.append({"params": pre, "lr": lr * multiplier, "name": "pretrained"})
    return groups


def frozen_for(freeze: bool | int, steps_per_epoch: int, factor: Any) -> Any:
    """The pretrained group's LR multiplier at optimizer step s: 0 during the first ``freeze``
    epochs (``model.freeze_pretrained: N``), then the schedule ``factor``."""
    if isinstance(freeze, bool) or freeze <= 0:
        return factor
    until = int(freeze) * steps_per_epoch

    def frozen_then(step: int) -> float:
        return 0.0 if step < until else float(factor(step))

    return frozen_then
