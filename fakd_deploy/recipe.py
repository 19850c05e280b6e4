"""Typed recipes: every number that shapes a result lives here and is checked on load.

A recipe is YAML validated into the `Recipe` schema. Unknown keys, wrong types and
out-of-range values are `RecipeError`s that name the dotted key and what it allows;
`--set a.b=value` overrides are checked against the same schema before anything runs.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from fakd_deploy.errors import RecipeError
from fakd_deploy.inputs import (
    MAX_BATCH,
    MAX_SCALE,
    MAX_SIDE,
    MAX_THREADS,
    MAX_YAML_BYTES,
    load_yaml,
    read_text,
)
from fakd_deploy.suggest import did_you_mean


def _not_a_boolean(value: Any) -> Any:
    """YAML's true and false are the integers 1 and 0 to Python, so `steps: true` would
    otherwise be one step; a number field refuses them."""
    if isinstance(value, bool):
        raise ValueError("a number is needed here, not true or false")
    return value


NotBool = BeforeValidator(_not_a_boolean)


def _worker_count(value: Any) -> int | str:
    """One check with one message, rather than one per member of `int | "auto"`."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"must be 'auto' or a number of loader processes, 0 or more (got {value!r})")


Int = Annotated[int, NotBool]
Float = Annotated[float, NotBool]
PositiveInt = Annotated[int, NotBool, Field(gt=0)]
NonNegativeInt = Annotated[int, NotBool, Field(ge=0)]
PositiveFloat = Annotated[float, NotBool, Field(gt=0)]
NonNegativeFloat = Annotated[float, NotBool, Field(ge=0)]
Side = Annotated[int, NotBool, Field(ge=1, le=MAX_SIDE)]
Batch = Annotated[int, NotBool, Field(ge=1, le=MAX_BATCH)]
Threads = Annotated[int, NotBool, Field(ge=1, le=MAX_THREADS)]
Scale = Annotated[float, NotBool, Field(gt=0, le=MAX_SCALE)]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The names a recipe may use. Each registry (`data.DATASETS`, `models.HEADS`,
# `distill.distiller.LOSSES`, `deploy.backends.BACKENDS`) holds exactly these keys; the
# tests check that they agree, so the schema stays a leaf that imports none of them.
DatasetName = Literal["synthetic", "camvid", "cityscapes", "ade20k", "voc", "folder"]
HeadName = Literal["deeplabv3", "deeplabv3plus", "pspnet", "fcn", "lraspp"]
LossName = Literal["kd", "cwd", "cwd_feat", "mse_feat"]
BoundName = Literal["marginal", "centred", "pairwise"]
BackendName = Literal[
    "ort-cpu-fp32",
    "ort-cpu-int8",
    "ort-cuda-fp32",
    "ort-cuda-fp16",
    "ort-trt-fp16",
    "ort-trt-int8",
    "trt-fp32",
    "trt-fp16",
    "trt-int8",
    "ort-fp32",
    "ort-int8",  # aliases of ort-cpu-fp32 and ort-cpu-int8
]


# What an exported model takes (`deploy.inputs`): normalised floats, float pixels or uint8 images.
InputMode = Literal["float", "pixels", "uint8"]

NAME_LIMIT = 64
VARIANT_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.+-]{{0,{NAME_LIMIT - 1}}}$")
SEED_LIMIT = 2**32  # numpy's global seed is 32 bits
Seed = Annotated[int, NotBool, Field(ge=0, lt=SEED_LIMIT)]
Workers = Annotated[int | Literal["auto"], PlainValidator(_worker_count)]
DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_name(name: str, what: str) -> str:
    """Names that become folder names: plain letters, digits and `_ . + -`, at most 64."""
    if len(name) > NAME_LIMIT:
        raise ValueError(
            f"{what} {name[:NAME_LIMIT]!r}... is {len(name)} characters long; the limit is {NAME_LIMIT}"
        )
    if not VARIANT_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} must be 1-{NAME_LIMIT} letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit (it names a folder)"
        )
    return name


class Section(BaseModel):
    # an infinite scale, timing or normalisation is never meant: it hangs or overflows later
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


S = TypeVar("S", bound=Section)


class DataConfig(Section):
    """Dataset, augmentation and loader settings shared by every model of the recipe."""

    name: DatasetName = "synthetic"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str | None = None
    crop: tuple[Side, Side] | None = (64, 64)
    scale: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    hflip: bool = True
    jitter: NonNegativeFloat = 0.2
    val_resize: tuple[Side, Side] | None = None
    mean: tuple[Float, Float, Float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD
    pixel_scale: PositiveFloat = 255.0
    ignore_index: Int = Field(default=255, ge=0, le=255)
    batch_size: Batch = 8
    val_batch_size: Batch = 8
    workers: Workers = "auto"

    @model_validator(mode="after")
    def _ordered_scale(self) -> DataConfig:
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"data.scale must be (low, high), got {list(self.scale)}")
        return self


class ModelConfig(Section):
    """Arguments of `fakd_deploy.models.build_model`."""

    name: HeadName = "deeplabv3"
    encoder: str = "resnet18"
    output_stride: Literal[8, 16, 32] = 8
    aux: bool = False
    pretrained: str | None = None
    channels: PositiveInt | None = None

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
    momentum: Float = Field(default=0.9, ge=0.0, lt=1.0)
    warmup_steps: NonNegativeInt = 0
    poly_power: NonNegativeFloat = 0.9
    grad_accum: PositiveInt = 1
    aux_weight: NonNegativeFloat = 0.4
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    sync_bn: bool = True
    eval_every: PositiveInt = 500
    checkpoint_every: PositiveInt = 200
    log_every: PositiveInt = 20


class LossTerm(Section):
    """One distillation term of a student variant; `lam0 > 0` adds FAKD's feature augmentation.

    `bound` (KD only) picks FAKD's closed form; `tau` does not apply to `mse_feat`. Setting a
    field that the term would ignore to anything but its default is an error, so no value
    is accepted and then unused.
    """

    loss: LossName
    weight: NonNegativeFloat = 1.0
    tau: PositiveFloat = 1.0
    lam0: NonNegativeFloat = 0.0
    bound: BoundName = "marginal"
    diagonal: bool = True

    @model_validator(mode="after")
    def _no_ignored_fields(self) -> LossTerm:
        """A value other than the default in a field this term does not use is refused.

        (Defaults are fine: a resolved recipe spells every field out.)
        """
        changed = {
            name
            for name in ("bound", "tau", "diagonal")
            if getattr(self, name) != type(self).model_fields[name].default
        }
        if "bound" in changed and self.loss != "kd":
            raise ValueError(f"'bound' applies to kd terms only; a {self.loss} term has one form")
        if "tau" in changed and self.loss == "mse_feat":
            raise ValueError("'tau' does not apply to mse_feat (a squared error has no temperature)")
        unused = sorted(changed & {"bound", "diagonal"})
        if unused and self.lam0 == 0:
            raise ValueError(f"{', '.join(unused)} only matter with FAKD (lam0 > 0); this term has lam0 = 0")
        return self


class ImportConfig(Section):
    """How to read a teacher trained elsewhere (see `models.import_state_dict`)."""

    strip_prefix: list[str] = Field(default_factory=lambda: ["module."])
    rename: dict[str, str] = Field(default_factory=dict)
    allow_missing: bool = False
    allow_unexpected: bool = False

    @field_validator("rename")
    @classmethod
    def _patterns(cls, rename: dict[str, str]) -> dict[str, str]:
        for pattern, replacement in rename.items():
            try:
                re.compile(pattern).sub(replacement, "")
                nested = repeats_a_repeat(pattern)
            except re.error as error:
                message = f"{pattern!r} -> {replacement!r} is not a regular expression: {error}"
                raise ValueError(message) from None
            if nested:
                raise ValueError(
                    f"{pattern!r} repeats a part that itself repeats without bound, which can take "
                    "forever on a key it does not match; write it without the outer repeat"
                )
        return rename


# Python's own regular-expression parser: its module moved in 3.11 and has no type stubs.
_REGEX_PARSER: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
INNER = {  # where the parts inside a group, an alternation or a lookaround are
    "SUBPATTERN": lambda arg: [arg[-1]],
    "BRANCH": lambda arg: arg[1],
    "ASSERT": lambda arg: [arg[1]],
    "ASSERT_NOT": lambda arg: [arg[1]],
}


def repeats_a_repeat(pattern: str) -> bool:
    """Whether a repeated group of `pattern` holds a part repeated without bound, as in
    `(\\w+\\.?)+!`: Python's backtracking matcher takes exponential time on such a pattern and
    cannot be interrupted (not even by Ctrl-C), so it is refused before any key meets it."""

    def walk(items: Any, repeated: bool) -> bool:
        for op, arg in items:
            if str(op) in REPEATS:
                unbounded = arg[1] == _REGEX_PARSER.MAXREPEAT
                if (repeated and unbounded) or walk(arg[2], repeated or unbounded):
                    return True
            elif str(op) in INNER and any(walk(part, repeated) for part in INNER[str(op)](arg)):
                return True
        return False

    return walk(_REGEX_PARSER.parse(pattern), False)


class TeacherConfig(Section):
    """A teacher trained here (`model` + `train`), or adopted: `checkpoint` or `weights`.

    `data` holds the keys of the recipe's `data` section that differ for the teacher, e.g.
    `{options: {num_images: {train: 4096}}}` for a teacher trained on more images than the
    student's labelled set; it is merged over `data` (mappings key by key).
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    weights: str | None = None
    weights_import: ImportConfig = Field(default_factory=ImportConfig)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.checkpoint and self.weights:
            raise ValueError("give teacher.checkpoint or teacher.weights, not both")
        return self


class StudentConfig(Section):
    """All variants share one model and one schedule, so their mIoUs are comparable."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    variants: dict[str, list[LossTerm]] = Field(default_factory=lambda: {"baseline": list[LossTerm]()})
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("variants")
    @classmethod
    def _plain_names(cls, variants: dict[str, list[LossTerm]]) -> dict[str, list[LossTerm]]:
        """Variant names become folder names: letters, digits and `_ . + -`, nothing else."""
        if not variants:
            raise ValueError("needs at least one variant, e.g. {baseline: []}")
        for name in variants:
            check_name(name, "variant name")
        return variants

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


class EvalConfig(Section):
    """How a prediction is formed; recorded with every mIoU so numbers stay comparable."""

    mode: Literal["whole", "slide"] = "whole"
    flip: bool = False
    scales: list[Scale] = Field(default_factory=lambda: [1.0], min_length=1)
    window: tuple[Side, Side] | None = None
    stride: tuple[Side, Side] | None = None

    @model_validator(mode="after")
    def _window_for_slide(self) -> EvalConfig:
        if self.mode == "slide" and self.window is None:
            raise ValueError("eval.mode 'slide' needs eval.window (h, w)")
        if self.mode == "whole" and (self.window or self.stride):
            raise ValueError("eval.window and eval.stride apply to mode 'slide' only")
        return self

    def describe(self) -> str:
        parts = [self.mode if self.mode != "slide" else f"slide{list(self.window or ())}"]
        if self.flip:
            parts.append("flip")
        if self.scales != [1.0]:
            parts.append("ms" + ",".join(f"{s:g}" for s in self.scales))
        return "+".join(parts)


class ExportConfig(Section):
    """The exported graph: its size and batch, its input mode (`float` normalised images,
    `pixels` 0-255 or `uint8` NHWC images with the normalisation inside), and for argmax
    exports the label type (`int32` or `uint8`)."""

    variant: str | None = None
    height: Side | None = None
    width: Side | None = None
    batch: Batch = 1
    dynamic: bool = False
    opset: Int = Field(default=18, ge=13, le=23)
    argmax: bool = False
    input: InputMode = "float"
    labels: Literal["int32", "uint8"] = "int32"
    tolerance: PositiveFloat = 1e-4

    @model_validator(mode="after")
    def _both_or_neither(self) -> ExportConfig:
        if (self.height is None) != (self.width is None):
            raise ValueError("give deploy.export.height and width together, or neither")
        if self.labels != "int32" and not self.argmax:
            raise ValueError("deploy.export.labels sets the type of argmax labels: it needs argmax: true")
        return self


class DeployConfig(Section):
    export: ExportConfig = Field(default_factory=ExportConfig)
    backends: list[BackendName] = Field(
        default_factory=lambda: list[BackendName](["ort-cpu-fp32", "ort-cpu-int8"])
    )
    calib: PositiveInt = 32
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    quantizer: Literal["ort", "modelopt"] = "ort"  # who places TensorRT's Q/DQ (X.qdq.onnx)


class BenchConfig(Section):
    """How `bench` measures: timing in `rounds` interleaved rounds (a row whose median moves
    more than `max_spread` percent between rounds is flagged), `pick` writes
    deploy/choice.json, `compare` draws that many validation images per backend."""

    threads: Threads | None = None
    batch: Batch = 1
    iters: PositiveInt | None = None
    seconds: NonNegativeFloat = 3.0  # 0: only the minimum number of calls (measure.MIN_ITERS)
    warmup_s: NonNegativeFloat = 1.0
    tolerance: NonNegativeFloat = 1.0
    max_images: PositiveInt | None = None
    rounds: PositiveInt = 5
    max_spread: PositiveFloat = 10.0
    pick: bool = False
    compare: NonNegativeInt = 0


class StudyConfig(Section):
    """A sweep for `fakd-deploy study`: every FAKD variant at every (lam0, bound) point.

    Each point is a variant of its own, named `<variant>-lam<lam0>-<bound>`, trained for
    every seed; `baseline` and `kd` name the variants the paired differences are taken
    against (same seed).
    """

    variants: list[str] | None = None
    lam0: list[PositiveFloat] = Field(default_factory=list)
    bounds: list[BoundName] = Field(default_factory=list)
    baseline: str = "baseline"
    kd: str | None = "kd"


class Recipe(Section):
    name: str
    seed: Seed = 0
    device: str = "auto"
    data: DataConfig
    teacher: TeacherConfig | None = None
    student: StudentConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE_NAME.match(device):
            raise ValueError(f"'{device}' is not a device: use auto, cpu, cuda, cuda:N or mps")
        return device

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_name(name, "recipe name")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        needs_teacher = any(self.student.variants.values())
        if needs_teacher and self.teacher is None:
            raise ValueError("student variants with distillation terms need a 'teacher' section")
        variant = self.deploy.export.variant
        if variant is not None and variant not in self.student.variants:
            raise ValueError(
                f"deploy.export.variant '{variant}' is not one of the student "
                f"variants: {', '.join(self.student.variants)}"
            )
        return self

    def teacher_data(self) -> DataConfig:
        """The data the teacher trains on: `data` with `teacher.data` merged over it."""
        if self.teacher is None or not self.teacher.data:
            return self.data
        return DataConfig.model_validate(merged(self.data.model_dump(mode="json"), self.teacher.data))

    def export_variant(self) -> str:
        return self.deploy.export.variant or list(self.student.variants)[-1]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_path(key: str, model: type[BaseModel] | None = Recipe) -> None:
    """Reject an override whose dotted key is not in the schema, naming the allowed keys."""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            return
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(model.model_fields)
            raise RecipeError(
                f"unknown recipe key '{key}': '{part}' is not allowed at {where}"
                f"{did_you_mean(part, model.model_fields)} (allowed: {allowed})"
            )
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
    node[leaf] = load_yaml(text, f"the value of --set {key}", RecipeError) if text.strip() else None


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` laid over it; nested mappings are merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _allowed_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows beside the last part of `loc` (a key path)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _section_type(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _format(error: ValidationError, prefix: str = "") -> str:
    """Pydantic's errors as one line: each names its dotted key; long values are cut."""
    lines = []
    for item in error.errors():
        key = ".".join([prefix] * bool(prefix) + [str(part) for part in item["loc"]]) or "recipe"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = [] if prefix else _allowed_at(tuple(item["loc"]))
            hint = did_you_mean(str(item["loc"][-1]), allowed) if allowed else ""
            listed = f" (allowed here: {', '.join(allowed)})" if allowed else ""
            lines.append(f"unknown recipe key '{key}'{hint}{listed}")
        elif isinstance(item.get("input"), dict | list) or item["type"] == "value_error":
            where = f"recipe key '{key}'" if item["loc"] else "recipe"
            lines.append(f"{where}: {message}")  # a section, or a check that names the value itself
        else:
            value = item.get("input")
            hint = ""
            if item["type"] in ("list_type", "tuple_type") and isinstance(value, str) and "," in value:
                hint = f"; write a list in brackets: {key}=[{value}]"
            got = repr(value)
            got = got if len(got) <= 80 else got[:77] + "..."
            lines.append(f"recipe key '{key}': {message} (got {got}){hint}")
    return "; ".join(lines)


def updated(section: S, prefix: str, values: dict[str, Any]) -> S:
    """The section with a command's options in place of its values (None: not given), checked
    as the recipe is, so that `--seconds inf` is refused like `--set bench.seconds=.inf`."""
    given = {key: value for key, value in values.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as error:
        raise RecipeError(_format(error, prefix)) from None


def parse_recipe(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a raw recipe dict (never modified) after applying `key.path=value` overrides."""
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(_format(error)) from None
    try:
        recipe.teacher_data()
    except ValidationError as error:
        raise RecipeError(_format(error, "teacher.data")) from None
    return recipe


def _recipes_near(path: Path) -> str:
    """The recipes that do exist where `path` was looked for (or in ./recipes), to pick from."""
    folder = path.parent if path.parent.is_dir() and path.parent != Path(".") else Path("recipes")
    found = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    if not found:
        return ""
    return f"{did_you_mean(path.name, found)}; recipes in {folder}: {', '.join(found)}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe file (a regular file of at most MAX_YAML_BYTES), checked against the schema."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise RecipeError(f"recipe file not found: {path}{_recipes_near(path)}")
    raw = load_yaml(read_text(path, "recipe", MAX_YAML_BYTES, RecipeError), str(path), RecipeError)
    if raw is None:
        raise RecipeError(f"{path} is empty: a recipe needs at least 'data' and 'student' sections")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys")
    raw.setdefault("name", path.stem)
    return parse_recipe(raw, overrides)
