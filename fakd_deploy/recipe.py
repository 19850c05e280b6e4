"""Typed recipes: every number that shapes a result lives here and is checked on load.

A recipe is YAML validated into the `Recipe` schema. Unknown keys, wrong types and
out-of-range values are `RecipeError`s that name the dotted key and what it allows;
`--set a.b=value` overrides are checked against the same schema before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Backend = Literal["ort-fp32", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8"]


class RecipeError(ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    """Dataset, augmentation and loader settings shared by every model of the recipe."""

    name: str = "synthetic"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[PositiveInt, PositiveInt] | None = (64, 64)
    scale: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    hflip: bool = True
    jitter: NonNegativeFloat = 0.2
    val_resize: tuple[PositiveInt, PositiveInt] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    pixel_scale: PositiveFloat = 255.0
    ignore_index: int = 255
    batch_size: PositiveInt = 8
    val_batch_size: PositiveInt = 8
    workers: NonNegativeInt = 0

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from fakd_deploy.data import DATASETS

        return _one_of(name, DATASETS)


class ModelConfig(Section):
    """Arguments of `fakd_deploy.models.build_model`."""

    name: str = "deeplabv3"
    encoder: str = "resnet18"
    output_stride: Literal[8, 16, 32] = 8
    aux: bool = False
    pretrained: str | None = None
    channels: PositiveInt | None = None

    @field_validator("name")
    @classmethod
    def _known_head(cls, name: str) -> str:
        from fakd_deploy.models import HEADS

        return _one_of(name, HEADS)

    def build_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(exclude={"channels"})
        if self.channels is not None:
            kwargs["channels"] = self.channels
        return kwargs


class TrainConfig(Section):
    """One schedule: poly decay after a linear warm-up, as in the segmentation literature."""

    steps: PositiveInt = 1000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    weight_decay: NonNegativeFloat = 1e-4
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_steps: NonNegativeInt = 0
    poly_power: NonNegativeFloat = 0.9
    grad_accum: PositiveInt = 1
    aux_weight: NonNegativeFloat = 0.4
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    sync_bn: bool = True
    eval_every: PositiveInt = 500
    checkpoint_every: PositiveInt = 200


class LossTerm(Section):
    """One distillation term; `lam0 > 0` adds FAKD's feature augmentation to it."""

    loss: str
    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 1.0
    lam0: NonNegativeFloat = 0.0
    bound: Literal["pairwise", "marginal"] = "marginal"
    diagonal: bool = True

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        from fakd_deploy.distill.distiller import LOSSES

        return _one_of(loss, LOSSES)


class ImportConfig(Section):
    """How to read a teacher trained elsewhere (see `models.import_state_dict`)."""

    strip_prefix: list[str] = Field(default_factory=lambda: ["module."])
    rename: dict[str, str] = Field(default_factory=dict)
    allow_missing: bool = False
    allow_unexpected: bool = False


class TeacherConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: str | None = None
    weights: str | None = None
    weights_import: ImportConfig = Field(default_factory=ImportConfig)


class StudentConfig(Section):
    """All variants share one model and one schedule, so their mIoUs are comparable."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    variants: dict[str, list[LossTerm]] = Field(default_factory=lambda: {"baseline": []})
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


class EvalConfig(Section):
    mode: Literal["whole", "slide"] = "whole"
    flip: bool = False
    scales: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)
    window: tuple[PositiveInt, PositiveInt] | None = None
    stride: tuple[PositiveInt, PositiveInt] | None = None


class ExportConfig(Section):
    variant: str | None = None
    height: PositiveInt | None = None
    width: PositiveInt | None = None
    batch: PositiveInt = 1
    dynamic: bool = False
    opset: int = Field(18, ge=13, le=23)
    argmax: bool = False
    tolerance: PositiveFloat = 1e-4


class DeployConfig(Section):
    export: ExportConfig = Field(default_factory=ExportConfig)
    backends: list[Backend] = Field(default_factory=lambda: ["ort-fp32", "ort-int8"])
    calib: PositiveInt = 32
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"


class BenchConfig(Section):
    threads: PositiveInt | None = None
    batch: PositiveInt = 1
    iters: PositiveInt | None = None
    seconds: PositiveFloat = 3.0
    warmup_s: NonNegativeFloat = 1.0
    tolerance: NonNegativeFloat = 1.0
    max_images: PositiveInt | None = None


class Recipe(Section):
    name: str
    seed: int = 0
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig = Field(default_factory=StudentConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        needs_teacher = any(self.student.variants.values())
        if needs_teacher and self.teacher is None:
            raise ValueError("student variants with distillation terms need a 'teacher' section")
        variant = self.deploy.export.variant
        if variant is not None and variant not in self.student.variants:
            raise ValueError(f"deploy.export.variant '{variant}' is not one of the student "
                             f"variants: {', '.join(self.student.variants)}")
        return self

    def export_variant(self) -> str:
        return self.deploy.export.variant or list(self.student.variants)[-1]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _one_of(value: str, registry: dict[str, Any]) -> str:
    if value not in registry:
        raise ValueError(f"'{value}' is not one of: {', '.join(sorted(registry))}")
    return value


def _check_path(key: str, model: type[BaseModel] | None = Recipe) -> None:
    """Reject an override whose dotted key is not in the schema, naming the allowed keys."""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            return
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(model.model_fields)
            raise RecipeError(f"unknown recipe key '{key}': '{part}' is not allowed at {where} "
                              f"(allowed: {allowed})")
        model = _section_type(model.model_fields[part].annotation)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b=value` to a raw recipe dict; the value is parsed as YAML (so 3, 0.1, [64, 64])."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override '{assignment}' must look like key.path=value")
    _check_path(key)
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "recipe"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown recipe key '{key}'")
        else:
            lines.append(f"recipe key '{key}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_recipe(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    raw = dict(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(_format(error)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys")
    raw.setdefault("name", path.stem)
    return parse_recipe(raw, overrides)
