"""5-point similarity alignment to the ArcFace template, a centre-crop fallback, and ``FaceAligner``.

The template is the standard ArcFace/insightface 112x112 one. Other output sizes scale it
uniformly; ``margin`` shrinks the face about the crop centre so the crop shows that fraction more
context (margin=0.25 at size 112: the 112x112 ArcFace content occupies the central 89.6x89.6 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facecls.core.errors import FaceclsError
from facecls.data.images import to_rgb
from facecls.faces.detect import PICKS, Pick, YuNetDetector, as_rgb_uint8, import_cv2, pick_face

# right eye, left eye, nose tip, right mouth corner, left mouth corner (image left to right for eyes)
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

STATUSES = ("aligned", "no-face", "center-crop", "unreadable", "skipped-existing")


def _check_size_margin(size: int, margin: float) -> None:
    if not isinstance(size, int) or size < 16:
        raise FaceclsError(f"crop size must be an integer of at least 16 pixels (e.g. 112, 160, 224), got {size!r}")
    if not 0.0 <= margin <= 2.0:
        raise FaceclsError(f"margin must be between 0 and 2 (fraction of extra border), got {margin!r}")


def template(size: int = 112, margin: float = 0.0) -> np.ndarray:
    """The five target landmark positions, as a (5, 2) array, for a ``size`` x ``size`` crop."""
    _check_size_margin(size, margin)
    unit = ARCFACE_112 / 112.0
    return ((unit - 0.5) / (1.0 + margin) + 0.5) * size


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama (1991), without reflections. Returns the 2x3 matrix M with dst ~ M @ [x, y, 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise FaceclsError(f"need matching (N>=2, 2) point arrays, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise FaceclsError("landmarks are degenerate (all at one point); cannot align this face")
    covariance = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(covariance)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 112, margin: float = 0.0) -> np.ndarray:
    """Warp the face whose 5 landmarks (YuNet order) are given onto the template; size x size x 3 uint8.

    Pixels outside the source image are black, as in insightface's ``norm_crop``.
    """
    cv2 = import_cv2()
    image = as_rgb_uint8(image_rgb)
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if points.shape != (5, 2):
        raise FaceclsError(f"need 5 landmarks (right eye, left eye, nose, mouth corners), got {points.shape}")
    matrix = similarity_transform(points, template(size, margin))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


def center_crop(image_rgb: np.ndarray, size: int = 112) -> np.ndarray:
    """The largest centred square, resized to size x size (fallback when no face is found)."""
    _check_size_margin(size, 0.0)
    image = as_rgb_uint8(image_rgb)
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class FaceReport:
    """What happened to one image; the row written to ``prepare_report.csv``."""

    status: str  # one of STATUSES
    faces_found: int = 0
    box: tuple[float, float, float, float] | None = None  # chosen face, x y w h in input pixels
    score: float | None = None
    detail: str = ""  # e.g. why an image was unreadable


class FaceAligner:
    """Detector + face choice + alignment for one image at a time (``prepare`` and ``predict --detect``).

    Holds one YuNet detector, so create one per process or thread.
    """

    def __init__(
        self,
        *,
        size: int = 112,
        margin: float = 0.0,
        pick: Pick = "largest",
        fallback_center_crop: bool = False,
        detector: Path | None = None,
        min_score: float = 0.6,
    ) -> None:
        _check_size_margin(size, margin)
        if pick not in PICKS:
            raise FaceclsError(f"unknown face pick {pick!r}; choose one of: {', '.join(PICKS)}")
        self.size = size
        self.margin = margin
        self.pick: Pick = pick
        self.fallback_center_crop = fallback_center_crop
        self.detector = YuNetDetector(detector, min_score=min_score)

    def align_array(self, image_rgb: np.ndarray) -> tuple[np.ndarray | None, FaceReport]:
        image = as_rgb_uint8(image_rgb)
        faces = self.detector(image)
        face = pick_face(faces, image.shape, self.pick)
        if face is not None:
            crop = align_face(image, face.landmarks, self.size, self.margin)
            return crop, FaceReport("aligned", len(faces), face.box, face.score)
        if self.fallback_center_crop:
            return center_crop(image, self.size), FaceReport("center-crop")
        return None, FaceReport("no-face")

    def __call__(self, pil_image: Image.Image) -> tuple[np.ndarray | None, FaceReport]:
        """Aligned size x size x 3 uint8 crop (None when no face and no fallback) and what happened."""
        try:
            image = np.asarray(to_rgb(pil_image))
        except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt pixel data
            return None, FaceReport("unreadable", detail=f"{type(exc).__name__}: {exc}")
        return self.align_array(image)


class DetectLoader:
    """An image loader (``path, size -> (RGB uint8 crop, status)``) that detects and aligns each photo, lazily
    building one detector per worker process; a photo without a face gives a centre crop, status "no-face"."""

    def __init__(self, detector: Path | None, margin: float):
        self.detector, self.margin, self.aligner = detector, margin, None

    def __call__(self, path: Path, size: int):
        from facecls.data.images import open_rgb, resize_square

        if self.aligner is None:
            self.aligner = FaceAligner(size=size, margin=self.margin, detector=self.detector)
        img = open_rgb(path)
        crop, _report = self.aligner(img)
        if crop is None:
            return resize_square(img, size), "no-face"
        return crop, "ok"
