"""Checkpoints: round trip, clear errors for bad files, and import of weights trained elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fakd_deploy.models import (
    Checkpoint,
    CheckpointError,
    Segmenter,
    build_model,
    import_state_dict,
    load_model,
)


def small_model() -> Segmenter:
    torch.manual_seed(0)
    return build_model("deeplabv3", 4, "resnet10t", aux=True, channels=16)


@pytest.fixture
def model() -> Segmenter:
    return small_model()


@pytest.fixture
def saved(tmp_path: Path, model: Segmenter) -> Path:
    return Checkpoint(
        model=model.state_dict(),
        arch=model.config,
        step=7,
        variant="kd",
        seed=3,
        metrics={"miou": 12.5, "per_class_iou": [None, 1.0]},
    ).save(tmp_path / "run" / "student.pt")


def test_round_trip_gives_identical_outputs(saved: Path, model: Segmenter) -> None:
    loaded = Checkpoint.load(saved)
    assert (loaded.step, loaded.variant, loaded.seed, loaded.metrics["per_class_iou"]) == (
        7,
        "kd",
        3,
        [None, 1.0],
    )
    restored = load_model(saved)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model.eval()(x))
    assert not restored.training
    assert restored.config == model.config


def test_save_leaves_no_temporary_files(saved: Path) -> None:
    assert [p.name for p in saved.parent.iterdir()] == ["student.pt"]


def test_truncated_file_names_the_file(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"student\.pt is not a readable checkpoint \(truncated"):
        Checkpoint.load(saved)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nothing\.pt does not exist"):
        Checkpoint.load(tmp_path / "nothing.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.pt is a directory"):
        Checkpoint.load(tmp_path / "folder.pt")


class Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("reader", ["checkpoint", "import"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(
    tmp_path: Path, model: Segmenter, reader: str
) -> None:
    marker, path = tmp_path / "ran", tmp_path / "crafted.pt"
    torch.save({"model": model.state_dict(), "arch": model.config, "x": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"crafted\.pt holds Python objects .*posix\.system.*refusing"):
        if reader == "checkpoint":
            Checkpoint.load(path)
        else:
            import_state_dict(build_model(**model.config), path)
    assert not marker.exists()


def test_missing_keys_are_named(tmp_path: Path, model: Segmenter) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(
        CheckpointError,
        match=r"weights\.pt is not a fakd-deploy checkpoint: "
        r"it lacks \['arch'\]",
    ):
        Checkpoint.load(path)


def test_weights_that_do_not_fit_the_arch(tmp_path: Path, model: Segmenter) -> None:
    arch = {**model.config, "channels": 8}
    path = Checkpoint(model=model.state_dict(), arch=arch).save(tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt do not fit"):
        load_model(path)


def test_saved_files_follow_the_umask(tmp_path: Path, model: Segmenter) -> None:
    import os

    previous = os.umask(0o022)
    try:
        from fakd_deploy.utils import file_mode

        file_mode.cache_clear()
        path = Checkpoint(model=model.state_dict(), arch=model.config).save(tmp_path / "m.pt")
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)
        file_mode.cache_clear()


def test_import_strips_prefix_and_unwraps(tmp_path: Path, model: Segmenter) -> None:
    path = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    fresh = build_model(**model.config)
    report = import_state_dict(fresh, path, strip_prefix=["module."])
    assert len(report["loaded"]) == len(model.state_dict())
    assert report["missing"] == report["unexpected"] == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_import_renames_by_regex(model: Segmenter) -> None:
    foreign = {r"^encoder\.body\.": "backbone.", r"^classifier\.": "decode_head.conv_seg."}
    state = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in foreign.items():
            key = re.sub(pattern, replacement, key)
        state[key] = value
    fresh = build_model(**model.config)
    import_state_dict(
        fresh, state, rename={r"^backbone\.": "encoder.body.", r"^decode_head\.conv_seg\.": "classifier."}
    )
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert torch.equal(
        fresh.encoder.body.state_dict()["conv1.0.weight"], model.encoder.body.state_dict()["conv1.0.weight"]
    )


def test_import_lists_missing_and_unexpected_keys(model: Segmenter) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("aux_classifier.")}
    state["decode_head.extra.weight"] = torch.zeros(1)
    fresh = build_model(**model.config)
    with pytest.raises(
        CheckpointError,
        match=r"missing keys: aux_classifier\.0\.0\.weight.*"
        r"1 unexpected keys: decode_head\.extra\.weight",
    ):
        import_state_dict(fresh, state)
    report = import_state_dict(fresh, state, allow_missing=True, allow_unexpected=True)
    assert "aux_classifier.2.bias" in report["missing"]
    assert report["unexpected"] == ["decode_head.extra.weight"]
    assert torch.equal(fresh.classifier.bias, model.classifier.bias)


def test_import_shape_mismatch_is_always_an_error(model: Segmenter) -> None:
    state = dict(model.state_dict())
    state["classifier.weight"] = torch.zeros(9, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"1 shape mismatches: classifier\.weight \(9, 16, 1, 1\)"):
        import_state_dict(build_model(**model.config), state, allow_missing=True, allow_unexpected=True)


def test_import_of_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"teacher\.pth is not a readable checkpoint"):
        import_state_dict(small_model(), path)


@pytest.mark.parametrize(
    "arch, message",
    [
        ({"num_classes": 400_000_000}, r"num_classes 400000000 is outside 1\.\.1024"),
        ({"num_classes": 0}, "num_classes 0"),
        ({"num_classes": True}, "num_classes True"),
        ({"num_classes": "4"}, "num_classes '4'"),
        ({"channels": 10**9}, r"channels 1000000000 is outside 1\.\.2048"),
        ({"flavour": "x"}, "flavour"),
    ],
)
def test_an_arch_is_bounded_before_anything_is_allocated(saved: Path, arch: dict, message: str) -> None:
    checkpoint = Checkpoint.load(saved)
    checkpoint.arch = {**checkpoint.arch, **arch}
    with pytest.raises(CheckpointError, match=rf"student\.pt.*{message}"):
        checkpoint.build(str(saved))


def test_the_zoo_itself_refuses_sizes_beyond_the_bounds() -> None:
    from fakd_deploy.errors import BadInput

    with pytest.raises(BadInput, match="outside the bounds"):
        build_model("fcn", 5000, "resnet10t")


@pytest.mark.timeout(60)
def test_a_checkpoint_that_is_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpoint.load(tmp_path / "weights.pt")


def test_unusable_tensors_are_named(model: Segmenter) -> None:
    from fakd_deploy.models.weights import first_unusable

    state = model.state_dict()
    assert first_unusable(state) is None
    variance = next(key for key in state if key.endswith("running_var"))
    for value, kind in ((float("nan"), "NaN"), (float("inf"), "infinite"), (-0.5, "negative variance")):
        damaged = {**state, variance: state[variance].clone()}
        damaged[variance][3] = value
        assert first_unusable(damaged) == f"'{variance}' holds {'a ' if value == -0.5 else ''}{kind}" + (
            " values" if kind == "infinite" else ""
        )


def crafted(saved: Path, **fields: object) -> Path:
    """`saved` with some stored fields replaced, as a hand-made file would hold them."""
    raw = torch.load(saved, weights_only=True)
    path = saved.with_name("crafted.pt")
    torch.save({**raw, **fields}, path)
    return path


ARCH = {"name": "fcn", "num_classes": 4, "encoder": "resnet10t"}


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"variant": "x/" + "../" * 12 + "tmp/PWNED"}, "'variant'"),
        ({"variant": ".."}, "'variant'"),
        ({"variant": ["kd"]}, "'variant'"),
        ({"role": "/tmp/PWNED"}, "'role'"),
        ({"role": None}, "'role'"),
        ({"seed": "0/../../PWNED"}, "'seed'"),
        ({"seed": -1}, "'seed'"),
        ({"class_names": 5}, "'class_names'"),
        ({"class_names": ["a", 1]}, "'class_names'"),
        ({"class_names": ["a", "b\x1b[2J"]}, "'class_names' has 'b\\x1b[2J' at 1"),
        ({"class_names": ["a", "a"]}, "'class_names' names 'a' twice"),
        ({"model": {0: torch.zeros(1)}}, "'model'"),
        ({"model": {"w": "x"}}, "'model'"),
        ({"arch": {**ARCH, "encoder": ["x"]}}, "encoder must be text"),
        ({"arch": {**ARCH, "output_stride": "8"}}, "output_stride must be a whole number"),
        ({"recipe": "name: x"}, "'recipe'"),
        ({"step": "7"}, "'step'"),
    ],
)
def test_a_stored_field_of_the_wrong_type_or_form_is_refused_by_name(
    saved: Path, fields: dict, key: str
) -> None:
    """Names end up in output file names and the rest in later steps: checked where read."""
    with pytest.raises(CheckpointError, match=rf"crafted\.pt: .*{re.escape(key)}"):
        Checkpoint.load(crafted(saved, **fields))


def test_the_names_runs_and_studies_give_still_load(saved: Path) -> None:
    for fields in (
        {"variant": "fakd_kd-lam0.1-marginal", "seed": 2**32 - 1},
        {"role": "teacher", "variant": None, "seed": None},
    ):
        loaded = Checkpoint.load(crafted(saved, **fields))
        assert (loaded.variant, loaded.seed) == (fields["variant"], fields["seed"])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("nan", "holds NaN"),
        ("inf", "holds infinite values"),
        ("int64", r"is torch\.int64 where the model has torch\.float32"),
        ("complex", r"is torch\.complex64 where the model has torch\.float32"),
    ],
)
def test_weights_that_would_load_into_nonsense_are_refused_naming_the_tensor(
    saved: Path, damage: str, message: str
) -> None:
    """Before, NaN weights or integer ones (cast silently) built a model that predicted nonsense."""
    state = torch.load(saved, weights_only=True)["model"]
    name = next(key for key, tensor in state.items() if tensor.is_floating_point())
    tensor = state[name].clone()
    if damage in ("nan", "inf"):
        tensor.view(-1)[0] = float(damage)
    else:
        tensor = tensor.to(torch.int64 if damage == "int64" else torch.complex64)
    path = crafted(saved, model={**state, name: tensor})
    with pytest.raises(CheckpointError, match=rf"crafted\.pt: weight '{re.escape(name)}' {message}"):
        load_model(path)


def test_half_precision_weights_still_load(saved: Path, model: Segmenter) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    restored = load_model(crafted(saved, model=half))
    assert restored.state_dict()[next(iter(half))].dtype == torch.float32


def deflated(source: Path, target: Path) -> Path:
    """The same archive with every entry deflated, as a zip tool would repack it."""
    import zipfile

    with zipfile.ZipFile(source) as packed, zipfile.ZipFile(target, "w") as repacked:
        for entry in packed.infolist():
            repacked.writestr(entry.filename, packed.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    return target


def test_a_zip_bomb_is_refused_before_it_is_unpacked(tmp_path: Path, model: Segmenter) -> None:
    # 80 MB of zeros deflate to about 80 KB: torch would allocate the 80 MB before reading.
    plain = Checkpoint(model={"pad": torch.zeros(20_000_000)}, arch=model.config).save(tmp_path / "plain.pt")
    bomb = deflated(plain, tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 200_000
    with pytest.raises(
        CheckpointError, match=r"bomb\.pt unpacks to 76 MiB from 0\.1 MiB on disk, more than 4x"
    ):
        Checkpoint.load(bomb)
    assert "pad" in Checkpoint.load(plain).model  # stored, the same tensors load


def test_a_checkpoint_repacked_with_compression_still_loads(saved: Path, model: Segmenter) -> None:
    repacked = deflated(saved, saved.with_name("repacked.pt"))
    assert repacked.stat().st_size < saved.stat().st_size
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(repacked)(x), model.eval()(x))
