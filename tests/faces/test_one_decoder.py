"""One decoder: a 16-bit PNG, an RGBA PNG, a CMYK JPEG and an EXIF-rotated JPEG of a real face give the
same pixels through ``prepare``, training's loader and ``predict --detect`` as a plain 8-bit RGB PNG of
what the decoder should see (transparency onto black, 16 bits scaled by 65535, EXIF rotation applied)."""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from facecls.commands.prepare import _SAVE_OPTIONS, prepare_folder
from facecls.data.datasets import FaceImages
from facecls.faces.align import DetectLoader

# Training decodes straight at the input size; a JPEG whose half size is under it is decoded whole (no
# libjpeg DCT scaling), so a JPEG variant and its PNG reference must agree to the last bit.
SIZE = 112


def _variants(face: Path, folder: Path) -> dict[str, str]:
    """Write each variant and its reference next to it; return variant file -> reference file."""
    folder.mkdir(parents=True)
    rgb = np.asarray(Image.open(face).convert("RGB"))

    # 16-bit greyscale, darkened so its maximum is well below 65535 (a decoder that stretched by the
    # image's maximum would brighten it).
    grey = (np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 7 // 10).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(grey).convert("RGB").save(folder / "grey16.ref.png")

    # Partly transparent, with white behind the fully transparent border: dropping alpha would show it.
    alpha = np.full(rgb.shape[:2], 200, np.uint8)
    alpha[:, :20] = 0
    behind = rgb.copy()
    behind[:, :20] = 255
    Image.fromarray(np.dstack([behind, alpha])).save(folder / "rgba.png")
    onto_black = (rgb.astype(np.float64) * alpha[..., None] / 255.0).round().astype(np.uint8)
    Image.fromarray(onto_black).save(folder / "rgba.ref.png")

    # CMYK JPEG: the reference is Pillow's own CMYK -> RGB of the decoded file.
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    with Image.open(folder / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        cmyk.convert("RGB").save(folder / "cmyk.ref.png")

    # Stored on its side (a taller-than-wide crop turned 90 degrees) with EXIF orientation 6.
    upright = rgb[:, 10:-10]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, 1).copy()).save(folder / "rotated.jpg", quality=95, exif=exif)
    with Image.open(folder / "rotated.jpg") as rotated:
        shown = ImageOps.exif_transpose(rotated).convert("RGB")
    assert shown.size == (upright.shape[1], upright.shape[0])
    assert np.abs(np.asarray(shown, dtype=int) - upright).mean() < 4  # upright again (JPEG rounding only)
    shown.save(folder / "rotated.ref.png")
    return {
        "grey16.png": "grey16.ref.png",
        "rgba.png": "rgba.ref.png",
        "cmyk.jpg": "cmyk.ref.png",
        "rotated.jpg": "rotated.ref.png",
    }


def _as_saved(crop: np.ndarray, name: str) -> np.ndarray:
    """``crop`` as ``prepare`` writes it under ``name`` (JPEG inputs keep JPEG, quality 95)."""
    image_format, options = _SAVE_OPTIONS[Path(name).suffix.lower()]
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format=image_format, **options)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_every_reader_decodes_each_variant_as_its_reference(faces_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "ben_afflek"
    pairs = _variants(faces_data / "five_celebrity" / "ben_afflek" / "test_ben.jpg", raw)

    # training's loader (the decoded cache fills its rows with the same load_image)
    paths = [raw / name for pair in pairs.items() for name in pair]
    images = FaceImages(paths, [0] * len(paths), SIZE)
    decoded = {path.name: images.image(i).permute(1, 2, 0).numpy() for i, path in enumerate(paths)}

    # predict --detect
    detect = DetectLoader(None, 0.0)
    detected = {path.name: detect(path, SIZE) for path in paths}

    # prepare
    out = tmp_path / "aligned"
    summary = prepare_folder(tmp_path / "raw", out, size=SIZE, workers=1, progress=False)
    assert summary.aligned == len(paths), summary

    for variant, reference in pairs.items():
        assert np.array_equal(decoded[variant], decoded[reference]), f"training: {variant}"
        (crop, status), (ref_crop, ref_status) = detected[variant], detected[reference]
        assert status == ref_status == "ok", variant
        assert np.array_equal(crop, ref_crop), f"predict --detect: {variant}"
        prepared = np.asarray(Image.open(out / "ben_afflek" / variant).convert("RGB"))
        ref_prepared = np.asarray(Image.open(out / "ben_afflek" / reference))
        assert np.array_equal(ref_prepared, ref_crop), f"prepare and predict --detect differ on {reference}"
        assert np.array_equal(prepared, _as_saved(ref_prepared, variant)), f"prepare: {variant}"
