"""Recipes: typed overrides, and errors that name the key for unknown keys and bad values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fakd_deploy.recipe import Recipe, RecipeError, load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.export_variant() in recipe.student.variants


def test_override_is_typed_by_the_schema() -> None:
    recipe = load_recipe(RECIPES / "quickstart.yaml",
                         ["student.train.steps=7", "data.crop=[32, 48]", "student.train.lr=0.5"])
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


def test_unknown_key_in_yaml_is_named() -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe key 'data\.colour'"):
        parse_recipe({"name": "x", "data": {"colour": "red"}})


def test_registry_values_list_the_choices() -> None:
    with pytest.raises(RecipeError, match=r"'student\.model\.name'.*deeplabv3"):
        parse_recipe({"name": "x", "student": {"model": {"name": "unet9000"}}})
    with pytest.raises(RecipeError, match=r"'data\.name'.*camvid"):
        parse_recipe({"name": "x", "data": {"name": "kitti"}})
    with pytest.raises(RecipeError, match=r"loss.*'mystery' is not one of.*kd"):
        parse_recipe({"name": "x", "teacher": {},
                      "student": {"variants": {"v": [{"loss": "mystery"}]}}})


def test_distillation_without_teacher_is_an_error() -> None:
    with pytest.raises(RecipeError, match="need a 'teacher' section"):
        parse_recipe({"name": "x", "student": {"variants": {"kd": [{"loss": "kd"}]}}})


def test_export_variant_must_exist() -> None:
    with pytest.raises(RecipeError, match=r"deploy\.export\.variant 'nope'"):
        parse_recipe({"name": "x", "deploy": {"export": {"variant": "nope"}}})


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
    reference = readme[readme.index("## Recipes"):readme.index("## The run folder")]
    missing = {f"{section.__name__}.{name}" for section in _sections(Recipe)
               for name in section.model_fields if not re.search(rf"\b{name}\b", reference)}
    assert not missing, f"README's recipe reference does not mention {sorted(missing)}"
