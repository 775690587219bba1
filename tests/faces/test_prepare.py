"""``prepare_folder`` on real Yale frames and on a messy folder: layout, report, resume, failures."""

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecls.commands.prepare import REPORT_COLUMNS, list_inputs, prepare_folder
from facecls.core.errors import FaceclsError
from facecls.data.scan import PREPARE_CONFIG, PREPARE_REPORT


def _report(out_dir: Path) -> dict[str, dict[str, str]]:
    with (out_dir / PREPARE_REPORT).open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == REPORT_COLUMNS
        return {row["file"]: row for row in reader}


@pytest.fixture(scope="module")
def yale_prepared(faces_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """All of Yale through two worker processes (the parallel path)."""
    raw, out = faces_data / "yale", tmp_path_factory.mktemp("yale") / "aligned"
    start = time.perf_counter()
    summary = prepare_folder(raw, out, workers=2, progress=False)
    print(f"prepare: all {summary.total} Yale frames in {time.perf_counter() - start:.1f} s with 2 workers")
    return raw, out, summary


def test_every_yale_image_gets_one_aligned_crop(yale_prepared: tuple) -> None:
    raw, out, summary = yale_prepared
    inputs = sorted(p.relative_to(raw).as_posix() for p in raw.glob("*/*.png"))
    assert summary.total == summary.aligned == len(inputs) == 164
    assert summary.no_face == summary.unreadable == summary.center_crop == summary.done_before == 0
    outputs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png"))
    assert outputs == inputs  # same identity folders and file names
    rows = _report(out)
    assert sorted(rows) == inputs
    for name, row in rows.items():
        assert row["status"] == "aligned" and row["output"] == name
        assert int(row["faces_found"]) >= 1 and float(row["score"]) > 0.8
        x, y, w, h = map(int, row["box"].split())
        assert 0 <= x < 320 and 0 <= y < 243 and 60 < w < 250 and 60 < h < 243
    with Image.open(out / inputs[0]) as crop:
        assert crop.size == (112, 112) and crop.mode == "RGB"
    assert json.loads((out / PREPARE_CONFIG).read_text()) == {"size": 112, "margin": 0.0, "pick": "largest"}
    assert not list(out.rglob(".*")), "no temporary files left behind"


def test_second_run_skips_everything_and_keeps_the_report(yale_prepared: tuple) -> None:
    raw, out, _ = yale_prepared
    before = _report(out)
    summary = prepare_folder(raw, out, workers=2, progress=False)
    assert summary.done_before == summary.total == 164 and summary.aligned == 0
    after = _report(out)
    assert {row["status"] for row in after.values()} == {"skipped-existing"}
    assert all(after[name]["box"] == before[name]["box"] for name in before)


def test_resume_redoes_only_missing_outputs(yale_prepared: tuple) -> None:
    raw, out, _ = yale_prepared
    (out / "subject03" / "subject03_wink.png").unlink()
    summary = prepare_folder(raw, out, workers=1, progress=False)
    assert (summary.done_before, summary.aligned) == (163, 1)
    assert _report(out)["subject03/subject03_wink.png"]["status"] == "aligned"


def test_resume_with_other_geometry_is_refused(yale_prepared: tuple) -> None:
    raw, out, _ = yale_prepared
    with pytest.raises(FaceclsError, match="size was 112, now 160"):
        prepare_folder(raw, out, size=160, progress=False)


def test_bad_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(FaceclsError, match="separate --out"):
        prepare_folder(tmp_path / "raw", tmp_path / "raw" / "aligned", progress=False)
    with pytest.raises(FaceclsError, match="does not exist"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "raw" / ".DS_Store").write_bytes(b"")
    with pytest.raises(FaceclsError, match="no files under"):
        prepare_folder(tmp_path / "raw", tmp_path / "out", progress=False)


@pytest.fixture
def messy_raw(faces_data: Path, tmp_path: Path) -> Path:
    """Identity folders with good, odd-format, broken, faceless and hidden files."""
    yale = faces_data / "yale"
    raw = tmp_path / "raw"
    (raw / "alice").mkdir(parents=True)
    (raw / "bob").mkdir()
    (raw / ".cache").mkdir()
    shutil.copy(yale / "subject01" / "subject01_normal.png", raw / "alice" / "a1.png")
    with Image.open(yale / "subject02" / "subject02_normal.png") as image:
        grey = image.convert("L")
    grey.convert("RGB").save(raw / "alice" / "a2.jpg", quality=95)
    # stored sideways; EXIF orientation 6 says "rotate 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    grey.transpose(Image.Transpose.ROTATE_90).save(raw / "alice" / "a3_sideways.jpg", exif=exif, quality=95)
    Image.fromarray(np.asarray(grey, np.uint16) * 257).save(raw / "alice" / "a4_16bit.png")
    grey.convert("P").save(raw / "alice" / "a5.gif")
    grey.convert("RGBA").save(raw / "alice" / "a6.webp", lossless=True)
    (raw / "bob" / "empty.jpg").write_bytes(b"")
    (raw / "bob" / "notes.png").write_text("this is not an image\n")
    Image.new("RGB", (320, 243), (128, 128, 128)).save(raw / "bob" / "grey_wall.png")
    with Image.open(yale / "subject03" / "subject03_normal.png") as image:
        image.save(raw / "bob" / "truncated.png")
    data = (raw / "bob" / "truncated.png").read_bytes()
    (raw / "bob" / "truncated.png").write_bytes(data[: len(data) // 2])
    (raw / "bob" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (raw / "bob" / "._grey_wall.png").write_bytes(b"\x00\x05\x16\x07")
    (raw / ".cache" / "x.png").write_bytes(b"")
    return raw


EXPECTED = {
    "alice/a1.png": ("aligned", "alice/a1.png"),
    "alice/a2.jpg": ("aligned", "alice/a2.jpg"),
    "alice/a3_sideways.jpg": ("aligned", "alice/a3_sideways.jpg"),
    "alice/a4_16bit.png": ("aligned", "alice/a4_16bit.png"),
    "alice/a5.gif": ("aligned", "alice/a5.gif.png"),
    "alice/a6.webp": ("aligned", "alice/a6.webp"),
    "bob/empty.jpg": ("unreadable", ""),
    "bob/notes.png": ("unreadable", ""),
    "bob/truncated.png": ("unreadable", ""),
    "bob/grey_wall.png": ("no-face", ""),
}


def test_messy_folder_is_reported_not_fatal(messy_raw: Path, tmp_path: Path) -> None:
    assert [p.as_posix() for p in list_inputs(messy_raw)] == sorted(EXPECTED)  # hidden files skipped
    out = tmp_path / "out"
    summary = prepare_folder(messy_raw, out, workers=1, progress=False)
    rows = _report(out)
    assert {name: (row["status"], row["output"]) for name, row in rows.items()} == EXPECTED
    assert (summary.total, summary.aligned, summary.unreadable, summary.no_face) == (10, 6, 3, 1)
    assert all(rows[name]["detail"] for name in ("bob/empty.jpg", "bob/notes.png", "bob/truncated.png"))
    assert rows["bob/grey_wall.png"]["faces_found"] == "0"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([o for _, o in EXPECTED.values() if o] + [PREPARE_CONFIG, PREPARE_REPORT])
    for _, output in EXPECTED.values():
        if output:
            with Image.open(out / output) as crop:
                assert crop.size == (112, 112) and crop.mode == "RGB"
    # EXIF orientation applied: the sideways copy is found where the upright one is
    upright = np.array(rows["alice/a2.jpg"]["box"].split(), dtype=float)
    sideways = np.array(rows["alice/a3_sideways.jpg"]["box"].split(), dtype=float)
    np.testing.assert_allclose(sideways, upright, atol=3)


def test_fallback_center_crops_faceless_images(messy_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = prepare_folder(messy_raw, out, fallback_center_crop=True, size=160, workers=1, progress=False)
    assert (summary.center_crop, summary.no_face, summary.unreadable) == (1, 0, 3)
    assert _report(out)["bob/grey_wall.png"]["status"] == "center-crop"
    with Image.open(out / "bob" / "grey_wall.png") as crop:
        assert crop.size == (160, 160)
        assert np.asarray(crop).std() == 0


def test_flat_folder_of_images(faces_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "test_images"
    raw.mkdir()
    for path in sorted((faces_data / "five_celebrity").glob("*/test_*.jpg"))[:3]:
        shutil.copy(path, raw / path.name)
    out = tmp_path / "out"
    summary = prepare_folder(raw, out, margin=0.2, pick="central", workers=1, progress=False)
    assert summary.aligned == 3
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(p.name for p in raw.iterdir())
