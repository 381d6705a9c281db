"""The fusion strategies, by name: the one list the CLI, the config and the registry share.

Kept free of torch imports so that ``mmai --help`` and config validation stay instant;
:mod:`mmai.models.registry` maps each name to its class and checks the two agree.
"""

from __future__ import annotations

#: every ``--fusion`` / ``model.fusion`` value, the default (cross_attention) first
FUSIONS: tuple[str, ...] = ("cross_attention", "concat", "early", "late", "film", "image_only", "clinical_only")

#: every ``model.encoder`` value (mmai.models.image_encoders.ENCODERS holds the classes; a test
#: checks the two agree)
ENCODER_NAMES: tuple[str, ...] = ("resnet", "densenet", "resnet10", "resnet18", "resnet34", "resnet50")
