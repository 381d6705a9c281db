"""mmai: multimodal medical AI (3D imaging + clinical tables) on MONAI."""

__version__ = "0.1.0"
