"""Decoding at the size that is needed: large JPEGs decode at a reduced DCT scale (before the usual
resize), upright and close to decoding them whole; other formats are untouched."""

from __future__ import annotations

import numpy as np
from PIL import Image

from facecls.data.images import load_image, open_rgb, resize_square


def _big_face_jpeg(faces_data, path, size=(1600, 1200), orientation=None):
    photo = sorted((faces_data / "five_celebrity" / "madonna").iterdir())[0]
    face = Image.open(photo).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    exif = face.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    face.save(path, quality=92, exif=exif)
    return path


def test_large_jpeg_decodes_at_the_smallest_scale_that_still_covers_the_size(faces_data, tmp_path):
    path = _big_face_jpeg(faces_data, tmp_path / "big.jpg")
    assert open_rgb(path).size == (1600, 1200)
    assert open_rgb(path, min_size=224).size == (400, 300)  # 1/4: 1/8 would be 200 x 150, under 224
    assert open_rgb(path, min_size=700).size == (1600, 1200)  # 1/2 would be 800 x 600: 600 < 700
    fast = load_image(path, 224).astype(int)
    whole = resize_square(open_rgb(path), 224).astype(int)
    assert fast.shape == whole.shape == (224, 224, 3)
    assert np.abs(fast - whole).mean() < 2.0  # the same picture, up to the downscaling filter


def test_reduced_scale_decoding_keeps_exif_rotation(faces_data, tmp_path):
    path = _big_face_jpeg(faces_data, tmp_path / "rotated.jpg", orientation=6)
    assert open_rgb(path, min_size=224).size == (300, 400)  # stored 400 x 300 at 1/4, shown upright
    fast = load_image(path, 224).astype(int)
    whole = resize_square(open_rgb(path), 224).astype(int)
    assert np.abs(fast - whole).mean() < 2.0


def test_other_formats_decode_whole(tmp_path):
    Image.fromarray(np.full((600, 800, 3), 90, np.uint8)).save(tmp_path / "big.png")
    assert open_rgb(tmp_path / "big.png", min_size=224).size == (800, 600)
    assert load_image(tmp_path / "big.png", 224)[0, 0].tolist() == [90, 90, 90]
