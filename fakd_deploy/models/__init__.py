"""The model zoo: timm encoders under DeepLabV3, DeepLabV3+, PSPNet, FCN and LR-ASPP heads.

`build_model` makes any of them, `model.config` rebuilds it, and a `Checkpoint` carries
both the config (`arch`) and the weights (`model`).
"""

from fakd_deploy.models.checkpoint import Checkpoint, CheckpointError, import_state_dict, load_model
from fakd_deploy.models.heads import HEADS, Head
from fakd_deploy.models.predictor import TorchPredictor
from fakd_deploy.models.segmenter import Encoder, ModelOutput, SegmentationModel, Segmenter, build_model
from fakd_deploy.models.zoo import ENCODERS, list_models, models_table

__all__ = [
    "ENCODERS",
    "HEADS",
    "Checkpoint",
    "CheckpointError",
    "Encoder",
    "Head",
    "ModelOutput",
    "SegmentationModel",
    "Segmenter",
    "TorchPredictor",
    "build_model",
    "import_state_dict",
    "list_models",
    "load_model",
    "models_table",
]
