"""Recipes: typed overrides, and errors that name the key for unknown keys and bad values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fakd_deploy.errors import RecipeError
from fakd_deploy.recipe import (
    BackendName,
    DatasetName,
    HeadName,
    LossName,
    Recipe,
    load_recipe,
    parse_recipe,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.export_variant() in recipe.student.variants


def test_override_is_typed_by_the_schema() -> None:
    recipe = load_recipe(
        RECIPES / "quickstart.yaml", ["student.train.steps=7", "data.crop=[32, 48]", "student.train.lr=0.5"]
    )
    assert recipe.student.train.steps == 7
    assert recipe.data.crop == (32, 48)
    assert recipe.student.train.lr == 0.5


def test_unknown_override_key_is_named() -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe key 'no\.such\.key'.*allowed: name"):
        load_recipe(RECIPES / "quickstart.yaml", ["no.such.key=1"])


def test_unknown_nested_key_lists_allowed_keys() -> None:
    with pytest.raises(RecipeError, match=r"'student\.train\.stepz'.*allowed: steps"):
        load_recipe(RECIPES / "quickstart.yaml", ["student.train.stepz=1"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(RecipeError, match=r"recipe key 'student\.train\.steps'.*integer"):
        load_recipe(RECIPES / "quickstart.yaml", ["student.train.steps=many"])


def test_out_of_range_is_named() -> None:
    with pytest.raises(RecipeError, match=r"recipe key 'student\.train\.lr'.*greater than 0"):
        load_recipe(RECIPES / "quickstart.yaml", ["student.train.lr=-1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.scales=[.inf]", r"'eval\.scales\.0': Input should be a finite number"),
        ("data.mean=[.nan, 0, 0]", r"'data\.mean\.0': Input should be a finite number"),
        ("data.jitter=.inf", r"'data\.jitter': Input should be a finite number"),
        ("bench.seconds=.inf", r"'bench\.seconds': Input should be a finite number"),
        ("eval.scales=[5]", r"'eval\.scales\.0': Input should be less than or equal to 4"),
        ("data.val_resize=[100000, 64]", r"'data\.val_resize\.0': .* less than or equal to 8192"),
        ("deploy.export.height=8193", r"'deploy\.export\.height': .* less than or equal to 8192"),
        ("data.val_batch_size=1025", r"'data\.val_batch_size': .* less than or equal to 1024"),
        ("bench.threads=100000", r"'bench\.threads': .* less than or equal to 512"),
        (
            'teacher.weights_import.rename={"(": "x"}',
            r"'teacher\.weights_import\.rename': '\(' -> 'x' is not a regular expression: missing \)",
        ),
        (
            r'teacher.weights_import.rename={"a": "\\9"}',
            r"'teacher\.weights_import\.rename': 'a' -> .* invalid group reference 9",
        ),
    ],
)
def test_infinite_and_runaway_settings_are_refused(override: str, message: str) -> None:
    """Values that would hang, overflow or exhaust memory long after loading."""
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPES / "quickstart.yaml", [override])


MINIMAL = {"name": "x", "data": {}, "student": {}}


def recipe(**sections: object) -> Recipe:
    return parse_recipe({**MINIMAL, **sections})


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("student.train.steps=true", "student.train.steps"),
        ("bench.seconds=false", "bench.seconds"),
        ("data.ignore_index=true", "data.ignore_index"),
        ("student.seeds=[0, true]", "student.seeds.1"),
        ("data.mean=[0.5, true, 0.5]", "data.mean.1"),
        ("data.crop=[true, 64]", "data.crop.0"),
        ("seed=true", "seed"),
        ("deploy.export.opset=true", "deploy.export.opset"),
        ("student.train.momentum=false", "student.train.momentum"),
        ("student.variants.kd=[{loss: kd, weight: true}]", "student.variants.kd.0.weight"),
    ],
)
def test_true_and_false_are_not_numbers(override: str, key: str) -> None:
    # To Python they are 1 and 0: `steps: true` would have trained one step.
    with pytest.raises(
        RecipeError, match=rf"^recipe key '{re.escape(key)}': a number is needed here, not true or false$"
    ):
        load_recipe(RECIPES / "quickstart.yaml", [override])


@pytest.mark.parametrize("value", ["-1", "false", "x", "1.5"])
def test_loader_workers_are_auto_or_a_count_in_one_message(value: str) -> None:
    with pytest.raises(
        RecipeError, match=r"^recipe key 'data.workers': must be 'auto' or a number of loader processes"
    ):
        load_recipe(RECIPES / "quickstart.yaml", [f"data.workers={value}"])
    assert load_recipe(RECIPES / "quickstart.yaml", ["data.workers=3"]).data.workers == 3


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        (r"(\w+\.?)+!", True),  # hung `train` past 90 s on a 60-character key
        (r"([\w.]+)+!", True),
        (r"(a*)*b", True),
        (r"(?:x|y+)*z", True),
        (r"(?=(a+)+)", True),
        (r"^module\.", False),
        (r"^(backbone)\.(.*)$", False),
        (r"encoder\.(\d+)\.", False),
        (r"(ab)+", False),
        (r"(a{2,5})+", False),
    ],
)
def test_a_rename_that_could_backtrack_forever_is_refused(pattern: str, refused: bool) -> None:
    rename = f"teacher.weights_import.rename={{{json.dumps(pattern)}: x}}"
    if refused:
        with pytest.raises(RecipeError, match="repeats a part that itself repeats without bound"):
            load_recipe(RECIPES / "quickstart.yaml", [rename])
    else:
        teacher = load_recipe(RECIPES / "quickstart.yaml", [rename]).teacher
        assert teacher is not None and pattern in teacher.weights_import.rename


def test_unknown_key_in_yaml_is_named() -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe key 'data\.colour'"):
        recipe(data={"colour": "red"})


def test_registry_values_list_the_choices() -> None:
    with pytest.raises(RecipeError, match=r"'student\.model\.name'.*deeplabv3"):
        recipe(student={"model": {"name": "unet9000"}})
    with pytest.raises(RecipeError, match=r"'data\.name'.*camvid"):
        recipe(data={"name": "kitti"})
    with pytest.raises(RecipeError, match=r"loss.*'kd'"):
        recipe(teacher={}, student={"variants": {"v": [{"loss": "mystery"}]}})


def test_schema_names_match_the_registries() -> None:
    """The schema lists the names; the registries hold the objects. They must agree."""
    from typing import get_args

    from fakd_deploy.data import DATASETS
    from fakd_deploy.deploy.backends import ALIASES, BACKENDS
    from fakd_deploy.distill.distiller import LOSSES
    from fakd_deploy.models import HEADS

    assert set(get_args(DatasetName)) == set(DATASETS)
    assert set(get_args(HeadName)) == set(HEADS)
    assert set(get_args(LossName)) == set(LOSSES)
    assert set(get_args(BackendName)) == set(BACKENDS) | set(ALIASES)


def test_recipe_module_is_a_leaf() -> None:
    """Loading a recipe imports none of the modules it names (data, models, losses, backends),
    only the bounded reader of user files."""
    import subprocess
    import sys

    code = (
        "import sys; import fakd_deploy.recipe; "
        "print(sorted(m for m in sys.modules if m.startswith('fakd_deploy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == [
        "fakd_deploy",
        "fakd_deploy.errors",
        "fakd_deploy.inputs",
        "fakd_deploy.recipe",
        "fakd_deploy.suggest",
    ]


def test_distillation_without_teacher_is_an_error() -> None:
    with pytest.raises(RecipeError, match="need a 'teacher' section"):
        recipe(student={"variants": {"kd": [{"loss": "kd"}]}})


def test_export_variant_must_exist() -> None:
    with pytest.raises(RecipeError, match=r"deploy\.export\.variant 'nope'"):
        recipe(deploy={"export": {"variant": "nope"}})


@pytest.mark.parametrize("name", ["../../victim", "/abs", "a/b", "..", ".hidden", "", "x" * 65, "a b"])
def test_variant_names_that_are_not_plain_are_refused(name: str) -> None:
    with pytest.raises(RecipeError, match="variant name"):
        recipe(student={"variants": {name: []}})


def test_recipe_name_cannot_leave_the_runs_folder() -> None:
    with pytest.raises(RecipeError, match="recipe name"):
        parse_recipe({**MINIMAL, "name": "../../etc"})


@pytest.mark.parametrize(
    "term, message",
    [
        ({"loss": "cwd", "bound": "pairwise", "lam0": 1.0}, "'bound' applies to kd terms only"),
        ({"loss": "mse_feat", "tau": 4.0}, "'tau' does not apply to mse_feat"),
        ({"loss": "kd", "bound": "pairwise"}, "only matter with FAKD"),
        ({"loss": "cwd", "bound": "centred", "lam0": 1.0}, "'bound' applies to kd terms only"),
        ({"loss": "kd", "diagonal": False}, "only matter with FAKD"),
    ],
)
def test_a_setting_a_term_would_ignore_is_an_error(term: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe(teacher={}, student={"variants": {"v": [term]}})


@pytest.mark.parametrize("device", ["banana", "cuda:x", "gpu"])
def test_unknown_device_is_refused_on_load(device: str) -> None:
    with pytest.raises(RecipeError, match=f"'{device}' is not a device"):
        recipe(device=device)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"eval": {"mode": "slide"}}, "needs eval.window"),
        ({"eval": {"window": [8, 8]}}, "apply to mode 'slide' only"),
        ({"deploy": {"export": {"height": 64}}}, "height and width together"),
        ({"data": {"scale": [2.0, 0.5]}}, "must be \\(low, high\\)"),
        ({"student": {"seeds": [1, 1]}}, "seeds must be distinct"),
        ({"teacher": {"checkpoint": "a.pt", "weights": "b.pth"}}, "not both"),
    ],
)
def test_inconsistent_sections_are_refused(sections: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe(**sections)


def test_empty_recipe_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(RecipeError, match=r"empty\.yaml is empty"):
        load_recipe(path)
    path.write_text("name: only\n")
    with pytest.raises(RecipeError, match="recipe key 'data': Field required"):
        load_recipe(path)


def test_overrides_do_not_change_the_raw_dict() -> None:
    raw = {**MINIMAL, "data": {"options": {"size": 32}}}
    parse_recipe(raw, ["data.options.size=48"])
    assert raw["data"]["options"]["size"] == 32


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trips() -> None:
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    import yaml

    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


def _types(annotation: object) -> list[object]:
    """An annotation and every type nested in it: dict[str, list[X]] -> [..., X]."""
    return [annotation, *(t for arg in getattr(annotation, "__args__", ()) for t in _types(arg))]


def _sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The model and every section below it."""
    found = [model]
    for field in model.model_fields.values():
        for kind in _types(field.annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += _sections(kind)
    return found


def test_readme_recipe_reference_names_every_key() -> None:
    readme = (RECIPES.parent / "README.md").read_text()
    reference = readme[readme.index("## Recipes") : readme.index("## The run folder")]
    missing = {
        f"{section.__name__}.{name}"
        for section in _sections(Recipe)
        for name in section.model_fields
        if not re.search(rf"\b{name}\b", reference)
    }
    assert not missing, f"README's recipe reference does not mention {sorted(missing)}"


def test_a_repeated_key_is_refused(tmp_path: Path) -> None:
    """Two `data:` sections: before, the last won silently."""
    path = tmp_path / "twice.yaml"
    path.write_text("data: {name: synthetic}\nstudent: {}\ndata: {name: camvid}\n")
    with pytest.raises(RecipeError, match=r"twice\.yaml.*'data' appears twice.*line 3"):
        load_recipe(path)
    path.write_text("data: {}\nstudent:\n  train: {steps: 3}\n  train: {steps: 4}\n")
    with pytest.raises(RecipeError, match="'train' appears twice"):
        load_recipe(path)


def test_merge_keys_still_override() -> None:
    """`<<: *base` followed by a key of its own is YAML's override, not a repeated key."""
    from fakd_deploy.inputs import load_yaml

    data = load_yaml("base: &b {steps: 3, lr: 0.5}\nx: {<<: *b, steps: 4}\n", "r", RecipeError)
    assert data["x"] == {"steps": 4, "lr": 0.5}


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: &a [*a]\n", "nests lists and mappings more than 64 deep"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nest"),
        ("a: !!python/name:os.system\n", "python/name"),
        ("a: !!python/object/new:os.system [ls]\n", "python/object"),
        (
            "x: &x [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"
            + "".join(
                f"l{i}: &l{i} [*{'x' if i == 0 else f'l{i - 1}'}, *{'x' if i == 0 else f'l{i - 1}'}]\n"
                for i in range(20)
            ),
            "100,000 values",
        ),
    ],
)
def test_yaml_traps_are_refused_in_one_line(text: str, message: str) -> None:
    from fakd_deploy.inputs import load_yaml

    with pytest.raises(RecipeError, match=message) as error:
        load_yaml(text, "trap.yaml", RecipeError)
    assert "\n" not in str(error.value)


def test_several_errors_are_one_line() -> None:
    with pytest.raises(RecipeError) as error:
        recipe(student={"train": {"steps": -1, "lr": -1}})
    assert "\n" not in str(error.value) and "steps" in str(error.value) and "lr" in str(error.value)


@pytest.mark.parametrize("field", ["name", "variant"])
def test_a_name_too_long_says_the_limit(field: str) -> None:
    long = "a" * 65
    sections = {"name": long} if field == "name" else {"student": {"variants": {long: []}}}
    with pytest.raises(RecipeError, match=r"65 characters long; the limit is 64"):
        parse_recipe({**MINIMAL, **sections})


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_recipe_that_is_not_a_regular_file_is_refused(path: str) -> None:
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(path)
