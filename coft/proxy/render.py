"""Procedural images for the proxy world: digits and shapes, colours, backgrounds, degradations.

Everything is drawn from a `Scene` description with PIL, so the same scene always gives the same
pixels. The pretraining corpus (`corpus.py`) and the target tasks (`tasks.py`) both draw scenes;
the tasks use fonts, backgrounds and degradations that the corpus never shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGE_SIZE = 64
_CANVAS = 128  # drawn at twice the size, then downsampled, for anti-aliased edges

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "arrow"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
    "pink": (250, 130, 190),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 70, 30),
}
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.85}
POSITIONS = {"center": (0.5, 0.5), "left": (0.33, 0.5), "right": (0.67, 0.5), "top": (0.5, 0.33), "bottom": (0.5, 0.67)}

# Seen in pretraining.
PRETRAIN_FONTS = ["typeset", "segment", "stroke"]
PRETRAIN_BACKGROUNDS = ["plain", "stripes", "dots", "checkerboard", "gradient", "grid"]
PRETRAIN_DEGRADATIONS = ["blurry", "pixelated", "noisy", "rotated"]
# Held out for the target tasks: the distribution shifts.
HELDOUT_FONTS = ["handwritten", "dotmatrix"]
HELDOUT_BACKGROUNDS = ["wood", "clouds", "scribbles"]
HELDOUT_DEGRADATIONS = ["heavy-noise", "occluded", "colour-cast", "jpeg", "low-contrast"]


@dataclass
class Scene:
    kind: str  # "digit" or "shape"
    label: int  # digit value or index into SHAPES
    colour: str
    background: str
    background_colour: str
    size: str = "medium"
    position: str = "center"
    font: str = "typeset"  # digits only
    filled: bool = True  # shapes only
    degradations: list[str] = field(default_factory=list)
    seed: int = 0  # drives every random detail of the drawing (jitter, noise, textures)


def render(scene: Scene) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    canvas = _background(scene.background, COLOURS[scene.background_colour], rng)
    scale = SIZES[scene.size] * rng.uniform(0.9, 1.1)
    cx, cy = POSITIONS[scene.position]
    cx, cy = (cx + rng.uniform(-0.04, 0.04)) * _CANVAS, (cy + rng.uniform(-0.04, 0.04)) * _CANVAS
    radius = scale * _CANVAS / 2
    colour = _jitter_colour(COLOURS[scene.colour], rng)
    draw = ImageDraw.Draw(canvas)
    if scene.kind == "digit":
        _draw_digit(canvas, draw, scene.label, scene.font, (cx, cy), radius, colour, rng)
    else:
        _draw_shape(draw, SHAPES[scene.label], (cx, cy), radius, colour, scene.filled, rng)
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    for degradation in scene.degradations:
        image = _degrade(image, degradation, rng)
    return image


# -- backgrounds -------------------------------------------------------------------------------

def _background(name: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    base = np.array(colour, dtype=np.float32)
    other = np.clip(base + rng.choice([-1, 1]) * rng.uniform(40, 90), 0, 255)
    yy, xx = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32)
    if name == "plain":
        mask = np.zeros_like(xx)
    elif name == "stripes":
        period, angle = rng.uniform(10, 24), rng.uniform(0, math.pi)
        mask = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif name == "dots":
        period = rng.uniform(14, 26)
        mask = ((((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < (period / 4) ** 2).astype(np.float32)
    elif name == "checkerboard":
        period = rng.uniform(12, 32)
        mask = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif name == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        mask = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    elif name == "grid":
        period = rng.uniform(12, 24)
        mask = (((xx % period) < 2) | ((yy % period) < 2)).astype(np.float32)
    elif name == "wood":
        warp = _smooth_noise(rng, 8) * 30
        rings = np.sin((np.hypot(xx - rng.uniform(-60, 0), yy - rng.uniform(-60, 0)) + warp) / rng.uniform(3, 6))
        mask = (rings + 1) / 2
        other = np.array([150, 100, 50], dtype=np.float32)
        base = np.array([205, 160, 110], dtype=np.float32)
    elif name == "clouds":
        mask = _smooth_noise(rng, 4) * 0.6 + _smooth_noise(rng, 16) * 0.4
        mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-6)
    elif name == "scribbles":
        image = Image.new("RGB", (_CANVAS, _CANVAS), tuple(int(c) for c in base))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(10, 18))):
            points = [tuple(rng.uniform(0, _CANVAS, size=2)) for _ in range(4)]
            stroke_colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.line(points, fill=stroke_colour, width=int(rng.integers(3, 7)))
        return image
    else:
        raise ValueError(f"unknown background {name!r}")
    pixels = base[None, None, :] * (1 - mask[..., None]) + other[None, None, :] * mask[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    image = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((_CANVAS, _CANVAS), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1


def _jitter_colour(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.uniform(-18, 18), 0, 255)) for c in colour)


# -- digits ------------------------------------------------------------------------------------

# Stroke font: each digit a list of polylines in a unit box (x right, y down).
_STROKES: dict[int, list[list[tuple[float, float]]]] = {
    0: [[(0.5, 0.0), (0.85, 0.2), (0.85, 0.8), (0.5, 1.0), (0.15, 0.8), (0.15, 0.2), (0.5, 0.0)]],
    1: [[(0.3, 0.2), (0.55, 0.0), (0.55, 1.0)], [(0.3, 1.0), (0.8, 1.0)]],
    2: [[(0.15, 0.2), (0.5, 0.0), (0.85, 0.2), (0.85, 0.4), (0.15, 1.0), (0.85, 1.0)]],
    3: [[(0.15, 0.05), (0.85, 0.05), (0.45, 0.45), (0.85, 0.65), (0.7, 0.95), (0.15, 0.95)]],
    4: [[(0.7, 1.0), (0.7, 0.0), (0.1, 0.7), (0.9, 0.7)]],
    5: [[(0.85, 0.0), (0.2, 0.0), (0.15, 0.45), (0.7, 0.4), (0.85, 0.7), (0.6, 1.0), (0.15, 0.9)]],
    6: [[(0.8, 0.05), (0.4, 0.1), (0.15, 0.6), (0.3, 1.0), (0.75, 0.95), (0.85, 0.65), (0.5, 0.45), (0.17, 0.6)]],
    7: [[(0.15, 0.0), (0.85, 0.0), (0.4, 1.0)]],
    8: [[(0.5, 0.5), (0.2, 0.3), (0.5, 0.0), (0.8, 0.3), (0.5, 0.5), (0.15, 0.75), (0.5, 1.0), (0.85, 0.75), (0.5, 0.5)]],
    9: [[(0.83, 0.4), (0.5, 0.55), (0.15, 0.35), (0.3, 0.0), (0.75, 0.05), (0.85, 0.4), (0.6, 0.9), (0.2, 0.95)]],
}

# Seven-segment display: a, b, c, d, e, f, g.
_SEGMENTS = {
    "a": [(0.15, 0.0), (0.85, 0.0)], "b": [(0.85, 0.0), (0.85, 0.5)], "c": [(0.85, 0.5), (0.85, 1.0)],
    "d": [(0.15, 1.0), (0.85, 1.0)], "e": [(0.15, 0.5), (0.15, 1.0)], "f": [(0.15, 0.0), (0.15, 0.5)],
    "g": [(0.15, 0.5), (0.85, 0.5)],
}
_SEGMENTS_ON = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]

# 5x7 dot-matrix glyphs, rows top to bottom.
_DOT_MATRIX = [
    ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
]

_TYPESET_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _draw_digit(canvas, draw, digit, font, centre, radius, colour, rng) -> None:
    cx, cy = centre
    height, width = 2 * radius, 1.2 * radius
    left, top = cx - width / 2, cy - height / 2

    def to_canvas(points):
        return [(left + x * width, top + y * height) for x, y in points]

    if font == "typeset":
        size = max(8, int(height * 1.25))
        if size not in _TYPESET_FONTS:
            _TYPESET_FONTS[size] = ImageFont.load_default(size=size)
        draw.text((cx, cy), str(digit), fill=colour, font=_TYPESET_FONTS[size], anchor="mm")
    elif font == "stroke":
        line_width = max(2, int(radius * rng.uniform(0.16, 0.24)))
        for polyline in _STROKES[digit]:
            draw.line(to_canvas(polyline), fill=colour, width=line_width, joint="curve")
    elif font == "segment":
        line_width = max(2, int(radius * rng.uniform(0.16, 0.22)))
        for segment in _SEGMENTS_ON[digit]:
            draw.line(to_canvas(_SEGMENTS[segment]), fill=colour, width=line_width)
    elif font == "handwritten":
        # The stroke skeleton, wobbled and slanted, with thin pen strokes: an unseen hand.
        line_width = max(2, int(radius * rng.uniform(0.08, 0.13)))
        slant = rng.uniform(-0.25, 0.25)
        for polyline in _STROKES[digit]:
            wobbly = [(x + slant * (0.5 - y) + rng.normal(0, 0.05), y + rng.normal(0, 0.05)) for x, y in polyline]
            draw.line(to_canvas(_smooth_polyline(wobbly)), fill=colour, width=line_width, joint="curve")
    elif font == "dotmatrix":
        rows = _DOT_MATRIX[digit]
        dot = radius * 0.11
        for r, row in enumerate(rows):
            for c, bit in enumerate(row):
                if bit == "1":
                    x, y = left + (c + 0.5) / 5 * width, top + (r + 0.5) / 7 * height
                    draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour)
    else:
        raise ValueError(f"unknown font {font!r}")


def _smooth_polyline(points: list[tuple[float, float]], steps: int = 4) -> list[tuple[float, float]]:
    """Chaikin corner cutting, so the hand-drawn strokes curve instead of bending."""
    for _ in range(2):
        if len(points) < 3:
            return points
        smoothed = [points[0]]
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            smoothed += [(0.75 * x0 + 0.25 * x1, 0.75 * y0 + 0.25 * y1), (0.25 * x0 + 0.75 * x1, 0.25 * y0 + 0.75 * y1)]
        smoothed.append(points[-1])
        points = smoothed
    return points


# -- shapes ------------------------------------------------------------------------------------

def _shape_polygon(shape: str, centre, radius, rotation) -> list[tuple[float, float]]:
    cx, cy = centre

    def polar(angles_and_radii):
        return [(cx + r * radius * math.cos(a + rotation), cy + r * radius * math.sin(a + rotation)) for a, r in angles_and_radii]

    if shape == "square":
        return polar([(math.pi / 4 + k * math.pi / 2, 0.95) for k in range(4)])
    if shape == "triangle":
        return polar([(-math.pi / 2 + k * 2 * math.pi / 3, 1.0) for k in range(3)])
    if shape == "diamond":
        return polar([(k * math.pi / 2, 1.0 if k % 2 else 0.65) for k in range(4)])
    if shape == "hexagon":
        return polar([(k * math.pi / 3, 0.95) for k in range(6)])
    if shape == "star":
        return polar([(-math.pi / 2 + k * math.pi / 5, 1.0 if k % 2 == 0 else 0.42) for k in range(10)])
    if shape == "cross":
        a, b = 0.3, 0.9
        points = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]
        return polar([(math.atan2(y, x), math.hypot(x, y)) for x, y in points])
    if shape == "arrow":
        points = [(-0.9, 0.25), (0.1, 0.25), (0.1, 0.6), (0.9, 0.0), (0.1, -0.6), (0.1, -0.25), (-0.9, -0.25)]
        return polar([(math.atan2(y, x), math.hypot(x, y)) for x, y in points])
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw, shape, centre, radius, colour, filled, rng) -> None:
    rotation = rng.uniform(-0.2, 0.2)
    outline_width = max(2, int(radius * 0.12))
    if shape == "circle":
        cx, cy = centre
        box = [cx - radius * 0.9, cy - radius * 0.9, cx + radius * 0.9, cy + radius * 0.9]
        if filled:
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=outline_width)
        return
    polygon = _shape_polygon(shape, centre, radius, rotation)
    if filled:
        draw.polygon(polygon, fill=colour)
    else:
        draw.line(polygon + [polygon[0]], fill=colour, width=outline_width, joint="curve")


# -- degradations ------------------------------------------------------------------------------

def _degrade(image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    if name == "blurry":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 1.8)))
    if name == "pixelated":
        side = int(rng.integers(14, 22))
        return image.resize((side, side), Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.NEAREST)
    if name == "noisy":
        return _add_noise(image, rng.uniform(20, 40), rng)
    if name == "rotated":
        return image.rotate(rng.uniform(-35, 35), resample=Image.Resampling.BILINEAR, fillcolor=image.getpixel((0, 0)))
    if name == "heavy-noise":
        return _add_noise(image.filter(ImageFilter.GaussianBlur(0.8)), rng.uniform(60, 80), rng)
    if name == "occluded":
        draw = ImageDraw.Draw(image)
        for _ in range(2):
            x, y = rng.uniform(8, 56, size=2)
            w, h = rng.uniform(6, 16, size=2)
            draw.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return image
    if name == "colour-cast":
        pixels = np.asarray(image, dtype=np.float32)
        cast = np.array([1.25, 0.95, 0.55], dtype=np.float32)
        return Image.fromarray((pixels * cast + np.array([30, 10, 0])).clip(0, 255).astype(np.uint8))
    if name == "jpeg":
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(5, 12)))
        return Image.open(buffer).convert("RGB")
    if name == "low-contrast":
        pixels = np.asarray(image, dtype=np.float32)
        return Image.fromarray((pixels.mean() + (pixels - pixels.mean()) * 0.35).clip(0, 255).astype(np.uint8))
    raise ValueError(f"unknown degradation {name!r}")


def _add_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    return Image.fromarray((pixels + rng.normal(0, sigma, pixels.shape)).clip(0, 255).astype(np.uint8))
