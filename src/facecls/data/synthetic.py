"""A deterministic synthetic face-identity dataset, drawn with numpy and Pillow only.

Each identity is a fixed set of facial parameters (face shape, skin tone, hair, eyes, brows, nose,
mouth, glasses, beard); each image shows that identity under nuisance variation (pose, rotation,
scale, expression, clothing, background clutter, lighting, blur, noise, JPEG quality). The output has
the Kaggle layout the rest of facecls reads::

    out_dir/train/id_0000/id_0000_0000.jpg ...
    out_dir/test/000000.jpg ...            (seeded shuffle; names do not reveal the identity)
    out_dir/test_solution.csv              (image_name,label)
    out_dir/synthetic.json                 (spec + generator version; written last)

It powers ``facecls demo`` and the end-to-end tests: no download, seconds to generate, and the same
spec always gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facecls.core.console import progress_bar
from facecls.core.errors import FaceclsError
from facecls.data.images import open_rgb

# Bump when the drawing changes, so cached datasets from an older generator are not reused.
GENERATOR_VERSION = 1
METADATA_FILE = "synthetic.json"
SOLUTION_FILE = "test_solution.csv"

Color = tuple[int, int, int]

_SKIN_TONES = np.array(
    [(255, 224, 196), (241, 194, 160), (224, 172, 125), (198, 134, 90), (161, 102, 64), (110, 68, 42)],
    dtype=np.float64,
)
_HAIR_COLORS = np.array(
    [
        (20, 16, 14),
        (55, 35, 22),
        (95, 60, 32),
        (140, 80, 40),
        (160, 50, 25),
        (205, 170, 100),
        (230, 210, 150),
        (150, 145, 140),
        (225, 225, 220),
    ],
    dtype=np.float64,
)
_IRIS_COLORS = np.array(
    [(60, 35, 20), (100, 60, 30), (70, 110, 160), (60, 120, 80), (120, 110, 60), (110, 120, 130)],
    dtype=np.float64,
)
HAIR_STYLES = ("bald", "short", "long", "side_part", "curly", "bun", "buzz")


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; the defaults make the `facecls demo` set (900 images at 64 px)."""

    identities: int = 20
    """Number of identities (class folders id_0000, id_0001, ...)."""
    images_per_identity: int = 40
    """Labelled images per identity under train/."""
    test_per_identity: int = 5
    """Unlabelled images per identity under test/ (their labels go to test_solution.csv)."""
    size: int = 64
    """Side of the square output images in pixels."""
    seed: int = 0
    """Seed for identities and nuisance; the same spec always gives byte-identical files."""

    def __post_init__(self) -> None:
        for name, low in (("identities", 1), ("images_per_identity", 1), ("test_per_identity", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise FaceclsError(f"synthetic {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.size, int) or not 32 <= self.size <= 1024:
            raise FaceclsError(f"synthetic size must be an integer from 32 to 1024 pixels, got {self.size!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise FaceclsError(f"synthetic seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Short hash of the spec and generator version: names the cache subfolder."""
        payload = json.dumps({**self.to_dict(), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed appearance of one identity; lengths are fractions of the image side."""

    face_half_width: float
    face_aspect: float
    jaw_taper: float
    forehead_taper: float
    skin: Color
    hair_style: str
    hair: Color
    hairline: float
    eye_height: float
    eye_spacing: float
    eye_width: float
    eye_aspect: float
    iris: Color
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_height: float
    mouth_width: float
    lip_thickness: float
    lips: Color
    smile: float
    ear_size: float
    glasses: Color | None
    glasses_round: bool
    beard: bool
    moustache: bool
    hair_tufts: tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that does not change who the face is."""

    shift: tuple[float, float]
    rotation: float
    scale: float
    yaw: float
    pitch: float
    smile: float
    mouth_open: float
    eye_open: float
    gaze: float
    brow_raise: float
    clothing: Color
    background: Color
    clutter_seed: int
    clutter_count: int
    light_angle: float
    light_strength: float
    brightness: float
    color_cast: tuple[float, float, float]
    blur: float
    noise: float
    jpeg_quality: int

    @classmethod
    def neutral(cls) -> Nuisance:
        """Frontal, centred, evenly lit, plain background: shows the identity parameters alone."""
        return cls(
            shift=(0.0, 0.0),
            rotation=0.0,
            scale=1.0,
            yaw=0.0,
            pitch=0.0,
            smile=0.0,
            mouth_open=0.0,
            eye_open=1.0,
            gaze=0.0,
            brow_raise=0.0,
            clothing=(70, 80, 110),
            background=(200, 200, 200),
            clutter_seed=0,
            clutter_count=0,
            light_angle=0.0,
            light_strength=0.0,
            brightness=1.0,
            color_cast=(1.0, 1.0, 1.0),
            blur=0.0,
            noise=0.0,
            jpeg_quality=95,
        )


def _color(value: np.ndarray) -> Color:
    r, g, b = np.clip(np.rint(value), 0, 255).astype(int).tolist()
    return (r, g, b)


def _palette(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> Color:
    """A colour between two neighbouring palette entries, jittered per channel."""
    pos = rng.uniform(0, len(palette) - 1)
    low = int(pos)
    high = min(low + 1, len(palette) - 1)
    mixed = palette[low] + (palette[high] - palette[low]) * (pos - low)
    return _color(mixed + rng.normal(0, jitter, 3))


def sample_identity(rng: np.random.Generator) -> FaceIdentity:
    """Draw one identity's fixed facial parameters."""
    half_width = rng.uniform(0.17, 0.23)
    hair_style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    has_glasses = rng.random() < 0.25
    beard = rng.random() < 0.2
    tufts = tuple(
        (float(rng.uniform(-1.1, 1.1)), float(rng.uniform(-1.25, -0.35)), float(rng.uniform(0.22, 0.4)))
        for _ in range(14)
    )
    return FaceIdentity(
        face_half_width=half_width,
        face_aspect=rng.uniform(1.15, 1.45),
        jaw_taper=rng.uniform(0.0, 0.4),
        forehead_taper=rng.uniform(0.0, 0.2),
        skin=_palette(rng, _SKIN_TONES, 8.0),
        hair_style=hair_style,
        hair=_palette(rng, _HAIR_COLORS, 10.0),
        hairline=rng.uniform(-0.75, -0.45),
        eye_height=rng.uniform(-0.2, 0.0),
        eye_spacing=rng.uniform(0.33, 0.5),
        eye_width=rng.uniform(0.17, 0.27),
        eye_aspect=rng.uniform(0.35, 0.6),
        iris=_palette(rng, _IRIS_COLORS, 12.0),
        brow_gap=rng.uniform(0.1, 0.22),
        brow_thickness=rng.uniform(0.03, 0.08),
        brow_arch=rng.uniform(0.0, 0.08),
        brow_tilt=rng.uniform(-0.08, 0.08),
        nose_length=rng.uniform(0.22, 0.4),
        nose_width=rng.uniform(0.12, 0.24),
        mouth_height=rng.uniform(0.45, 0.62),
        mouth_width=rng.uniform(0.28, 0.5),
        lip_thickness=rng.uniform(0.03, 0.08),
        lips=_color(np.array([190, 90, 90]) + rng.normal(0, 18, 3)),
        smile=rng.uniform(-0.3, 0.6),
        ear_size=rng.uniform(0.15, 0.25),
        glasses=_palette(rng, _HAIR_COLORS[:5], 15.0) if has_glasses else None,
        glasses_round=bool(rng.random() < 0.5),
        beard=beard,
        moustache=beard or rng.random() < 0.1,
        hair_tufts=tufts,
    )


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw the variation of one image."""
    return Nuisance(
        shift=(float(rng.normal(0, 0.04)), float(rng.normal(0, 0.04))),
        rotation=float(rng.normal(0, 8.0)),
        scale=float(rng.uniform(0.85, 1.15)),
        yaw=float(rng.uniform(-1, 1)),
        pitch=float(rng.uniform(-1, 1)),
        smile=float(rng.normal(0, 0.35)),
        mouth_open=float(max(0.0, rng.normal(0, 0.6))),
        eye_open=float(np.clip(rng.normal(0.9, 0.2), 0.15, 1.2)),
        gaze=float(rng.uniform(-1, 1)),
        brow_raise=float(rng.normal(0, 0.5)),
        clothing=_color(rng.uniform(20, 235, 3)),
        background=_color(rng.uniform(30, 230, 3)),
        clutter_seed=int(rng.integers(2**31)),
        clutter_count=int(rng.integers(3, 12)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.6)),
        brightness=float(rng.uniform(0.7, 1.25)),
        color_cast=(
            float(rng.uniform(0.88, 1.12)),
            float(rng.uniform(0.9, 1.1)),
            float(rng.uniform(0.88, 1.12)),
        ),
        blur=float(rng.choice([0.0, rng.uniform(0.3, 1.1)])),
        noise=float(rng.uniform(0.0, 9.0)),
        jpeg_quality=int(rng.integers(45, 96)),
    )


def _supersample(size: int) -> int:
    return max(2, min(4, math.ceil(256 / size)))


def _shade(color: Color, factor: float) -> Color:
    return _color(np.array(color) * factor)


def _draw_background(canvas: int, nuisance: Nuisance) -> Image.Image:
    image = Image.new("RGB", (canvas, canvas), nuisance.background)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(nuisance.clutter_seed)
    for _ in range(nuisance.clutter_count):
        kind = int(rng.integers(4))
        color = _color(rng.uniform(0, 255, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * canvas
        w, h = rng.uniform(0.08, 0.6, 2) * canvas
        box = (x0, y0, x0 + w, y0 + h)
        if kind == 0:
            draw.rectangle(box, fill=color)
        elif kind == 1:
            draw.ellipse(box, fill=color)
        elif kind == 2:
            draw.line(box, fill=color, width=max(1, int(rng.uniform(0.01, 0.05) * canvas)))
        else:
            points = [tuple(p) for p in (rng.uniform(-0.1, 1.1, (3, 2)) * canvas)]
            draw.polygon(points, fill=color)
    return image


def _face_outline(cx: float, cy: float, a: float, b: float, face: FaceIdentity) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    s = np.sin(t)
    x = a * np.cos(t) * np.where(s > 0, 1 - face.jaw_taper * s**2, 1 - face.forehead_taper * s**2)
    y = b * s
    return list(zip((cx + x).tolist(), (cy + y).tolist(), strict=True))


def _draw_face_layer(canvas: int, face: FaceIdentity, nuisance: Nuisance) -> Image.Image:
    """The head and shoulders on a transparent layer, in the canonical (unrotated, centred) frame."""
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    c = float(canvas)
    a = face.face_half_width * c
    b = a * face.face_aspect
    cx, cy = 0.5 * c, 0.47 * c
    # Turning the head moves the inner features against the outline (nose most, as it sticks out).
    fx = cx + nuisance.yaw * 0.22 * a
    fy = cy + nuisance.pitch * 0.08 * b
    skin = face.skin
    hair = face.hair

    def box(x: float, y: float, rx: float, ry: float) -> tuple[float, float, float, float]:
        return (x - rx, y - ry, x + rx, y + ry)

    if face.hair_style == "long":
        draw.rounded_rectangle((cx - 1.35 * a, cy - 1.15 * b, cx + 1.35 * a, cy + 1.05 * b), radius=0.9 * a, fill=hair)
    elif face.hair_style == "curly":
        for tx, ty, tr in face.hair_tufts:
            draw.ellipse(box(cx + tx * a, cy + ty * b, tr * a * 1.2, tr * a * 1.2), fill=hair)
    elif face.hair_style == "bun":
        draw.ellipse(box(cx, cy - 1.15 * b, 0.45 * a, 0.4 * a), fill=hair)

    # Neck and shoulders; clothing changes per image.
    draw.rectangle((cx - 0.45 * a, cy + 0.6 * b, cx + 0.45 * a, cy + 1.35 * b), fill=_shade(skin, 0.85))
    draw.ellipse((cx - 2.4 * a, cy + 1.2 * b, cx + 2.4 * a, cy + 3.2 * b), fill=nuisance.clothing)
    draw.polygon(
        [(cx - 0.45 * a, cy + 1.2 * b), (cx + 0.45 * a, cy + 1.2 * b), (cx, cy + 1.45 * b)],
        fill=_shade(skin, 0.85),
    )

    ear_r = face.ear_size * b
    for side in (-1, 1):
        visible = 1.0 - 0.5 * max(0.0, side * nuisance.yaw)
        draw.ellipse(
            box(cx + side * 0.97 * a, cy + face.eye_height * b + 0.15 * b, 0.35 * ear_r * visible, ear_r),
            fill=_shade(skin, 0.93),
        )

    if face.hair_style in ("short", "side_part", "bun", "buzz"):
        cap_rx = a * (1.08 if face.hair_style != "buzz" else 1.02)
        draw.ellipse(box(cx, cy - 0.12 * b, cap_rx, b * 0.98), fill=hair)

    draw.polygon(_face_outline(cx, cy, a, b, face), fill=skin)

    if face.beard:
        t = np.linspace(0.05 * np.pi, 0.95 * np.pi, 30)
        s = np.sin(t)
        outer_x = cx + a * np.cos(t) * (1 - face.jaw_taper * s**2)
        outer_y = cy + b * s
        inner_y = fy + b * (face.mouth_height - 0.12 + 0.2 * (s - 0.3))
        points = list(zip(outer_x.tolist(), outer_y.tolist(), strict=True))
        points += list(zip(outer_x[::-1].tolist(), np.minimum(inner_y, outer_y)[::-1].tolist(), strict=True))
        draw.polygon(points, fill=hair)

    # Hair in front of the forehead.
    top = cy - b * 1.02
    line_y = cy + face.hairline * b
    if face.hair_style in ("short", "bun", "long", "curly"):
        draw.chord((cx - 1.05 * a, top, cx + 1.05 * a, line_y + (line_y - top)), 180, 360, fill=hair)
    elif face.hair_style == "side_part":
        draw.polygon(
            [
                (cx - 1.05 * a, cy - 0.2 * b),
                (cx - 1.0 * a, top + 0.2 * b),
                (cx - 0.3 * a, top),
                (cx + 0.8 * a, top + 0.15 * b),
                (cx + 1.05 * a, cy - 0.3 * b),
                (cx + 0.3 * a, line_y),
                (cx - 0.6 * a, line_y - 0.05 * b),
            ],
            fill=hair,
        )
    elif face.hair_style == "buzz":
        draw.chord(
            (cx - a, top, cx + a, line_y + (line_y - top)),
            180,
            360,
            fill=_color((np.array(hair) + np.array(skin)) / 2),
        )

    # Brows.
    eye_y = fy + face.eye_height * b
    eye_rx = face.eye_width * a
    for side in (-1, 1):
        ex = fx + side * face.eye_spacing * a
        u = np.linspace(0, 1, 6)
        bx = ex - side * eye_rx * 1.1 + side * u * eye_rx * 2.3
        by = (
            eye_y
            - face.brow_gap * b
            - nuisance.brow_raise * 0.03 * b
            - face.brow_arch * b * np.sin(np.pi * u)
            + face.brow_tilt * b * u
        )
        width = max(1, round(face.brow_thickness * b))
        draw.line(
            list(zip(bx.tolist(), by.tolist(), strict=True)),
            fill=_shade(hair, 0.8),
            width=width,
            joint="curve",
        )

    # Eyes: white, iris (squashed rather than clipped when the lids close), upper lid line.
    eye_ry = eye_rx * face.eye_aspect * nuisance.eye_open
    iris_r = eye_rx * 0.5
    for side in (-1, 1):
        ex = fx + side * face.eye_spacing * a
        draw.ellipse(box(ex, eye_y, eye_rx, max(eye_ry, 0.5)), fill=(240, 238, 232))
        ix = ex + nuisance.gaze * 0.35 * eye_rx
        draw.ellipse(box(ix, eye_y, iris_r, min(iris_r, eye_ry)), fill=face.iris)
        draw.ellipse(box(ix, eye_y, iris_r * 0.45, min(iris_r * 0.45, eye_ry * 0.5)), fill=(15, 12, 12))
        draw.arc(
            box(ex, eye_y, eye_rx * 1.05, eye_ry * 1.1 + 0.5),
            190,
            350,
            fill=(40, 28, 24),
            width=max(1, round(0.012 * c)),
        )

    # Nose: a shadow along one side and two nostrils.
    nose_x = fx + nuisance.yaw * 0.12 * a
    nose_top = eye_y + 0.05 * b
    nose_tip = eye_y + face.nose_length * b
    nose_rx = face.nose_width * a
    shadow = _shade(skin, 0.78)
    draw.line(
        [(nose_x - 0.15 * nose_rx, nose_top), (nose_x - 0.35 * nose_rx, nose_tip)],
        fill=shadow,
        width=max(1, round(0.01 * c)),
    )
    draw.ellipse(box(nose_x, nose_tip, nose_rx * 0.8, nose_rx * 0.35), fill=_shade(skin, 0.9))
    for side in (-1, 1):
        draw.ellipse(
            box(nose_x + side * nose_rx * 0.45, nose_tip + 0.02 * b, nose_rx * 0.22, nose_rx * 0.12),
            fill=_shade(skin, 0.5),
        )

    # Mouth: curvature from the identity's habitual smile plus the expression of this image.
    mouth_y = fy + face.mouth_height * b
    mouth_rx = face.mouth_width * a
    curve = (face.smile + nuisance.smile) * 0.12 * b
    opening = nuisance.mouth_open * 0.06 * b
    u = np.linspace(-1, 1, 21)
    bend = 1 - u**2
    base = mouth_y + curve * bend
    lip = face.lip_thickness * b * np.sqrt(bend)
    xs = (fx + u * mouth_rx).tolist()
    upper = list(zip(xs, (base - opening / 2 - lip).tolist(), strict=True))
    lower = list(zip(xs, (base + opening / 2 + lip * 1.2).tolist(), strict=True))
    draw.polygon(upper + lower[::-1], fill=face.lips)
    if opening > 0.004 * c:
        top_in = list(zip(xs, (base - opening / 2).tolist(), strict=True))
        bottom_in = list(zip(xs, (base + opening / 2).tolist(), strict=True))
        draw.polygon(top_in + bottom_in[::-1], fill=(70, 20, 25))
    draw.line(
        list(zip(xs, base.tolist(), strict=True)),
        fill=_shade(face.lips, 0.55),
        width=max(1, round(0.008 * c)),
    )

    if face.moustache:
        draw.polygon(
            [
                (fx - mouth_rx * 1.05, mouth_y - 0.02 * b),
                (fx, mouth_y - 0.13 * b),
                (fx + mouth_rx * 1.05, mouth_y - 0.02 * b),
                (fx, mouth_y - 0.07 * b),
            ],
            fill=hair,
        )

    if face.glasses is not None:
        lens_rx, lens_ry = eye_rx * 1.5, eye_rx * 1.15
        frame = max(1, round(0.014 * c))
        for side in (-1, 1):
            ex = fx + side * face.eye_spacing * a
            lens = box(ex, eye_y, lens_rx, lens_ry)
            if face.glasses_round:
                draw.ellipse(lens, outline=face.glasses, width=frame)
            else:
                draw.rounded_rectangle(lens, radius=lens_ry * 0.4, outline=face.glasses, width=frame)
        bridge_x = face.eye_spacing * a - lens_rx
        draw.line([(fx - bridge_x, eye_y), (fx + bridge_x, eye_y)], fill=face.glasses, width=frame)
    return layer


def _place(layer: Image.Image, nuisance: Nuisance) -> Image.Image:
    """Rotate, scale and shift the face layer about the image centre."""
    c = layer.width
    theta = math.radians(nuisance.rotation)
    cos, sin = math.cos(theta) / nuisance.scale, math.sin(theta) / nuisance.scale
    ox = c / 2 + nuisance.shift[0] * c
    oy = c / 2 + nuisance.shift[1] * c
    # Inverse map (output -> input pixel): input = centre + R(-theta) (output - offset) / scale.
    coeffs = (cos, sin, c / 2 - cos * ox - sin * oy, -sin, cos, c / 2 + sin * ox - cos * oy)
    # Nearest is enough: the canvas is supersampled and box-reduced afterwards (and 50x faster than bicubic).
    return layer.transform((c, c), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.NEAREST)


def _photograph(image: Image.Image, nuisance: Nuisance, rng: np.random.Generator) -> Image.Image:
    """Lighting gradient, brightness, colour cast, blur and sensor noise at the output size."""
    size = image.width
    pixels = np.asarray(image, dtype=np.float32)
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / (size / 2)
    light = coords[None, :] * math.cos(nuisance.light_angle) + coords[:, None] * math.sin(nuisance.light_angle)
    gain = nuisance.brightness * (1 + nuisance.light_strength * light)
    pixels = pixels * gain[:, :, None] * np.asarray(nuisance.color_cast, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if nuisance.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(nuisance.blur * size / 64))
    if nuisance.noise > 0:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, nuisance.noise, (size, size, 3))
        image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return image


def render_face(
    face: FaceIdentity, nuisance: Nuisance, size: int, noise_rng: np.random.Generator | None = None
) -> Image.Image:
    """Draw one RGB image of `face` under `nuisance`, supersampled then downsampled to `size`."""
    factor = _supersample(size)
    canvas = size * factor
    image = _draw_background(canvas, nuisance).convert("RGBA")
    image.alpha_composite(_place(_draw_face_layer(canvas, face, nuisance), nuisance))
    image = image.convert("RGB").reduce(factor)
    return _photograph(image, nuisance, noise_rng if noise_rng is not None else np.random.default_rng(0))


def identity_name(index: int) -> str:
    return f"id_{index:04d}"


def _identity(spec: SyntheticSpec, index: int) -> FaceIdentity:
    return sample_identity(np.random.default_rng([spec.seed, 0, index]))


def _save_jpeg(image: Image.Image, path: Path, quality: int) -> None:
    image.save(path, format="JPEG", quality=quality, optimize=False)


def _read_metadata(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, spec: SyntheticSpec) -> bool:
    """The metadata file is written last, so its presence with the right spec means a finished set."""
    meta = _read_metadata(out_dir)
    return (
        meta is not None
        and meta.get("spec") == spec.to_dict()
        and meta.get("generator_version") == GENERATOR_VERSION
        and (out_dir / SOLUTION_FILE).is_file()
        and _count(out_dir / "train") == spec.identities
        and _count(out_dir / "test") == spec.identities * spec.test_per_identity
    )


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else -1


def _write_dataset(root: Path, spec: SyntheticSpec, progress: bool) -> None:
    train_dir, test_dir = root / "train", root / "test"
    test_dir.mkdir(parents=True)
    total_test = spec.identities * spec.test_per_identity
    # Test file numbers are a seeded permutation, so name order says nothing about identity.
    test_numbers = np.random.default_rng([spec.seed, 2]).permutation(total_test)
    width = max(6, len(str(total_test - 1)))
    solution: list[tuple[str, str]] = []
    bar = progress_bar("synthetic faces (identities)", spec.identities, enabled=progress)
    for identity in range(spec.identities):
        name = identity_name(identity)
        face = _identity(spec, identity)
        class_dir = train_dir / name
        class_dir.mkdir(parents=True)
        for image in range(spec.images_per_identity + spec.test_per_identity):
            rng = np.random.default_rng([spec.seed, 1, identity, image])
            nuisance = sample_nuisance(rng)
            picture = render_face(face, nuisance, spec.size, rng)
            if image < spec.images_per_identity:
                path = class_dir / f"{name}_{image:04d}.jpg"
            else:
                number = int(test_numbers[identity * spec.test_per_identity + image - spec.images_per_identity])
                path = test_dir / f"{number:0{width}d}.jpg"
                solution.append((path.name, name))
            _save_jpeg(picture, path, nuisance.jpeg_quality)
        bar.advance()
    bar.close()
    with open(root / SOLUTION_FILE, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_name", "label"])
        writer.writerows(sorted(solution))
    meta = {
        "spec": spec.to_dict(),
        "generator_version": GENERATOR_VERSION,
        "fingerprint": spec.fingerprint(),
        "train_images": spec.identities * spec.images_per_identity,
        "test_images": total_test,
    }
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def generate_synthetic_faces(out_dir: Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = False) -> Path:
    """Write the synthetic dataset for `spec` into `out_dir` and return `out_dir`.

    If `out_dir` already holds a complete dataset for the same spec, nothing is rewritten. The set is
    built in a temporary sibling folder and renamed into place, so an interrupted run never leaves a
    half-written folder that looks complete.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        found = _read_metadata(out_dir)
        what = f"a synthetic set for spec {found.get('spec')}" if isinstance(found, dict) else "other files"
        raise FaceclsError(
            f"{out_dir} already holds {what}; choose an empty or new folder for spec {spec.to_dict()} "
            "(or delete that folder)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_dataset(tmp, spec, progress)
        try:
            os.replace(tmp, out_dir)  # replaces an empty out_dir; fails if another process filled it
        except OSError:
            if not _is_complete(out_dir, spec):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_synthetic_faces(cache_dir: Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = False) -> Path:
    """The dataset for `spec` in a cache subfolder named from the spec; generated only when missing."""
    shape = f"{spec.identities}x{spec.images_per_identity}+{spec.test_per_identity}-{spec.size}px"
    name = f"synthetic-{shape}-seed{spec.seed}-{spec.fingerprint()}"
    return generate_synthetic_faces(Path(cache_dir) / name, spec, progress)


def _load_pixels(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(open_rgb(p), dtype=np.float32).reshape(-1) for p in paths])


def linear_probe_accuracy(data_dir: Path, l2: float = 1e-5, max_iter: int = 100) -> float:
    """Test accuracy of multinomial logistic regression on standardised raw pixels.

    A difficulty gauge for a generated set: near 1.0 means identities are separable without learning
    any invariance, near chance means the nuisance drowns the identity. Trained on train/, scored on
    test/ against test_solution.csv; deterministic (zero init, full-batch L-BFGS).
    """
    import torch  # only the probe needs torch; generation is numpy + Pillow

    data_dir = Path(data_dir)
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise FaceclsError(f"{train_dir} not found; point the linear probe at a generated synthetic dataset")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise FaceclsError(f"{train_dir} needs at least two identity folders for a linear probe")
    index = {name: i for i, name in enumerate(classes)}
    train_paths = [p for name in classes for p in sorted((train_dir / name).glob("*.jpg"))]
    try:
        with open(data_dir / SOLUTION_FILE, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise FaceclsError(f"cannot read {data_dir / SOLUTION_FILE} ({error}); the probe needs test labels") from error
    if not rows:
        raise FaceclsError(f"{data_dir / SOLUTION_FILE} has no rows; generate a set with test_per_identity >= 1")

    x_train = torch.from_numpy(_load_pixels(train_paths))
    x_test = torch.from_numpy(_load_pixels([data_dir / "test" / row["image_name"] for row in rows]))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([index[p.parent.name] for p in train_paths])
    y_test = torch.tensor([index[row["label"]] for row in rows])
    # Far fewer images than pixels: with an L2 penalty the optimal weights lie in the span of the
    # training images, so fitting on their coordinates in that span (from the eigendecomposition of
    # the Gram matrix) is exact, and far cheaper and better conditioned than fitting all pixels.
    pixels = x_train.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh((x_train @ x_train.T).double() / pixels)
    keep = eigenvalues > 1e-9 * eigenvalues.max()
    eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
    z_train = (eigenvectors * eigenvalues.sqrt()).float()
    z_test = ((x_test @ x_train.T).double() / pixels @ eigenvectors / eigenvalues.sqrt()).float()
    weights = torch.zeros(z_train.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z_train @ weights + bias, y_train) + l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (z_test @ weights + bias).argmax(1)
    return float((predicted == y_test).double().mean())
