"""The model zoo: timm encoders under DeepLabV3, DeepLabV3+, PSPNet, FCN and LR-ASPP heads.

`build_model` makes any of them, `model.config` rebuilds it, and checkpoints carry both the
config (`arch`) and the weights (`model`).
"""

from fakd_deploy.models.checkpoint import (
    CheckpointError,
    import_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from fakd_deploy.models.heads import HEADS, Head
from fakd_deploy.models.segmenter import Encoder, ModelOutput, Segmenter, build_model
from fakd_deploy.models.zoo import ENCODERS, list_models, print_models

__all__ = [
    "ENCODERS",
    "HEADS",
    "CheckpointError",
    "Encoder",
    "Head",
    "ModelOutput",
    "Segmenter",
    "build_model",
    "import_state_dict",
    "list_models",
    "load_checkpoint",
    "model_from_checkpoint",
    "print_models",
    "save_checkpoint",
]
