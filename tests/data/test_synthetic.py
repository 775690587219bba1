"""The synthetic face generator: layout, determinism, caching, atomicity and difficulty."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecls.core.errors import FaceclsError
from facecls.data import synthetic
from facecls.data.synthetic import (
    Nuisance,
    SyntheticSpec,
    ensure_synthetic_faces,
    generate_synthetic_faces,
    linear_probe_accuracy,
    render_face,
    sample_identity,
)

TINY = SyntheticSpec(identities=4, images_per_identity=3, test_per_identity=2, size=48, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _solution(root: Path) -> list[dict[str, str]]:
    with open(root / "test_solution.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_faces(tmp_path_factory.mktemp("tiny") / "faces", TINY)


def test_layout_and_counts(tiny: Path) -> None:
    classes = sorted(p.name for p in (tiny / "train").iterdir())
    assert classes == ["id_0000", "id_0001", "id_0002", "id_0003"]
    for name in classes:
        images = sorted((tiny / "train" / name).iterdir())
        assert [p.name for p in images] == [f"{name}_{i:04d}.jpg" for i in range(3)]
        with Image.open(images[0]) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 48)
    assert len(list((tiny / "test").iterdir())) == 4 * 2
    meta = json.loads((tiny / "synthetic.json").read_text())
    assert meta["spec"] == TINY.to_dict()
    assert meta["train_images"] == 12 and meta["test_images"] == 8
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["faces"], "temporary folder left behind"


def test_solution_matches_test_files(tiny: Path) -> None:
    header = (tiny / "test_solution.csv").read_text().splitlines()[0]
    assert header == "image_name,label"
    rows = _solution(tiny)
    names = [row["image_name"] for row in rows]
    assert names == sorted(names)
    assert set(names) == {p.name for p in (tiny / "test").iterdir()}
    labels = [row["label"] for row in rows]
    assert sorted(labels) == sorted([f"id_{i:04d}" for i in range(4)] * 2)


def test_test_names_do_not_reveal_identity(tiny: Path) -> None:
    rows = _solution(tiny)
    assert [row["image_name"] for row in rows] == [f"{i:06d}.jpg" for i in range(8)]
    assert all(re.fullmatch(r"\d{6}\.jpg", row["image_name"]) for row in rows)
    labels = [row["label"] for row in rows]
    assert labels != sorted(labels), "test numbering follows identity order"


def test_same_spec_is_byte_identical(tiny: Path, tmp_path: Path) -> None:
    again = generate_synthetic_faces(tmp_path / "again", TINY)
    assert _files(again) == _files(tiny)
    other = generate_synthetic_faces(tmp_path / "other", SyntheticSpec(**{**TINY.to_dict(), "seed": 1}))
    assert _files(other).keys() == _files(tiny).keys()
    assert _files(other) != _files(tiny)


def test_ensure_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_synthetic_faces(tmp_path, TINY)
    assert first.parent == tmp_path and TINY.fingerprint() in first.name
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def must_not_run(*args: object) -> None:
        raise AssertionError("complete cached dataset was regenerated")

    monkeypatch.setattr(synthetic, "_write_dataset", must_not_run)
    assert ensure_synthetic_faces(tmp_path, TINY) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    monkeypatch.undo()
    bigger = ensure_synthetic_faces(tmp_path, SyntheticSpec(**{**TINY.to_dict(), "identities": 5}))
    assert bigger != first and len(list((bigger / "train").iterdir())) == 5


def test_interrupted_generation_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_render = synthetic.render_face

    def render_then_fail(*args: object, **kwargs: object) -> Image.Image:
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated interruption")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_face", render_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        generate_synthetic_faces(tmp_path / "faces", TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (generate_synthetic_faces(tmp_path / "faces", TINY) / "synthetic.json").is_file()


def test_refuses_a_folder_with_other_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FaceclsError, match="choose an empty or new folder"):
        generate_synthetic_faces(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_spec_validation() -> None:
    with pytest.raises(FaceclsError, match="identities"):
        SyntheticSpec(identities=0)
    with pytest.raises(FaceclsError, match="size"):
        SyntheticSpec(size=8)


def test_identities_differ_and_render_deterministically() -> None:
    faces = [sample_identity(np.random.default_rng([0, 0, i])) for i in range(6)]
    neutral = [np.asarray(render_face(face, Nuisance.neutral(), 64), dtype=np.float32) for face in faces]
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            assert np.abs(neutral[i] - neutral[j]).mean() > 3.0, f"identities {i} and {j} look the same"
    again = np.asarray(render_face(faces[0], Nuisance.neutral(), 64), dtype=np.float32)
    assert np.array_equal(again, neutral[0])


@pytest.mark.parametrize("size", [112, 160, 224])
def test_renders_at_model_resolutions(size: int) -> None:
    rng = np.random.default_rng(3)
    image = render_face(sample_identity(rng), synthetic.sample_nuisance(rng), size, rng)
    assert image.size == (size, size) and image.mode == "RGB"


def test_linear_probe_is_above_chance_and_below_perfect(tmp_path: Path) -> None:
    spec = SyntheticSpec(identities=8, images_per_identity=10, test_per_identity=5, size=32, seed=0)
    accuracy = linear_probe_accuracy(generate_synthetic_faces(tmp_path / "faces", spec))
    chance = 1 / spec.identities
    assert 2 * chance < accuracy < 1.0
