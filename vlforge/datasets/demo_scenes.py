"""Procedural shape scenes for the demo dataset: sampling, rendering, captions and questions.

A scene has one large *main* object (its shape is the class label) and up to two small ones,
all with distinct shapes so every question below has exactly one right answer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 155, 55),
    "blue": (35, 80, 215),
    "yellow": (230, 190, 15),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
}
BACKGROUNDS = ("speckled", "striped", "shaded")
NUMBER_WORDS = ("zero", "one", "two", "three")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Object extents in pixels at 64 px; they scale with image_size. The gap between the ranges
# keeps "small" and "large" tellable apart even after random crops.
SMALL_PX = (14, 18)
LARGE_PX = (26, 32)
REFERENCE_SIZE = 64
_COLOR_JITTER = 12
_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down for clean edges
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    rgb: tuple[int, int, int]  # the jittered colour actually drawn
    size: str  # "small" | "large"
    size_px: int  # width and height of the object's bounding box
    x: int  # bounding-box centre, pixels from the left
    y: int  # bounding-box centre, pixels from the top

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "size_px": self.size_px,
            "x": self.x,
            "y": self.y,
        }


@dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUNDS
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    angle: float  # gradient / stripe direction in radians
    period: float  # stripe period in pixels
    noise_seed: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


def _scaled(px_range: tuple[int, int], image_size: int) -> tuple[int, int]:
    factor = image_size / REFERENCE_SIZE
    return max(2, round(px_range[0] * factor)), max(2, round(px_range[1] * factor))


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_COLOR_JITTER, _COLOR_JITTER))) for c in rgb)  # type: ignore[return-value]


def _sample_background(rng: random.Random) -> Background:
    # Light, low-saturation colours with little contrast so shapes always stand out.
    grey = rng.randint(205, 245)
    light = tuple(min(255, grey + rng.randint(-10, 10)) for _ in range(3))
    darker = rng.randint(12, 30)
    dark = tuple(max(0, c - darker) for c in light)
    return Background(
        kind=rng.choice(BACKGROUNDS),
        colors=(light, dark),  # type: ignore[arg-type]
        angle=rng.uniform(0, math.pi),
        period=rng.uniform(6, 12),
        noise_seed=rng.getrandbits(32),
    )


def _separated(a: tuple[int, int, int], b: tuple[int, int, int], gap: int) -> bool:
    """True when the square boxes (x, y, size) of a and b are at least `gap` pixels apart on some axis."""
    reach = (a[2] + b[2]) / 2 + gap
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _place(sizes: list[int], image_size: int, rng: random.Random) -> list[tuple[int, int]] | None:
    margin = max(1, image_size // 32)
    for _ in range(_PLACEMENT_TRIES):
        boxes: list[tuple[int, int, int]] = []
        for size in sizes:
            low, high = size // 2 + margin, image_size - (size - size // 2) - margin
            box = (rng.randint(low, high), rng.randint(low, high), size)
            if not all(_separated(box, other, margin) for other in boxes):
                break
            boxes.append(box)
        else:
            return [(x, y) for x, y, _ in boxes]
    return None


def sample_scene(rng: random.Random, image_size: int = REFERENCE_SIZE) -> Scene:
    """Draw a random scene; all randomness comes from `rng`, so equal seeds give equal scenes."""
    background = _sample_background(rng)
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    colors = [rng.choice(list(COLORS)) for _ in shapes]
    large, small = _scaled(LARGE_PX, image_size), _scaled(SMALL_PX, image_size)
    sizes = [rng.randint(*large)] + [rng.randint(*small) for _ in shapes[1:]]
    positions = _place(sizes, image_size, rng)
    while positions is None:  # crowded layout: drop a small object and retry
        shapes, colors, sizes = shapes[:-1], colors[:-1], sizes[:-1]
        positions = _place(sizes, image_size, rng)
    objects = tuple(
        SceneObject(shape, color, _jitter(COLORS[color], rng), "large" if i == 0 else "small", size, x, y)
        for i, (shape, color, size, (x, y)) in enumerate(zip(shapes, colors, sizes, positions, strict=True))
    )
    return Scene(objects=objects, background=background)


def _render_background(bg: Background, image_size: int) -> np.ndarray:
    coords = np.arange(image_size, dtype=np.float32)
    xs, ys = coords[None, :], coords[:, None]
    light, dark = (np.asarray(c, dtype=np.float32) for c in bg.colors)
    along = xs * math.cos(bg.angle) + ys * math.sin(bg.angle)
    if bg.kind == "shaded":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif bg.kind == "striped":
        t = 0.5 + 0.5 * np.sin(along * (2 * math.pi / bg.period))
    else:
        t = np.zeros((image_size, image_size), dtype=np.float32)
    image = light + t[..., None] * (dark - light)
    if bg.kind == "speckled":
        noise = np.random.default_rng(bg.noise_seed).normal(0.0, 7.0, size=(image_size, image_size, 1))
        image = image + noise.astype(np.float32)
    return image


def _shape_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Coverage of `obj` in [0, 1] per pixel, anti-aliased by supersampling."""
    ss = _SUPERSAMPLE
    mask = Image.new("L", (image_size * ss, image_size * ss), 0)
    draw = ImageDraw.Draw(mask)
    # Continuous coordinates of the bounding box; the object covers exactly size_px pixels.
    cx, cy, h = obj.x * ss, obj.y * ss, obj.size_px * ss / 2
    x0, y0, x1, y1 = cx - h, cy - h, cx + h - 1, cy + h - 1
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif obj.shape == "star":
        # Outer radius chosen so the star is size_px wide; shift down to centre its bounding box.
        r = (x1 - x0) / (2 * math.cos(math.radians(18)))
        sy = cy + r * (1 - math.cos(math.radians(36))) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), sy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif obj.shape == "cross":
        arm = (x1 - x0) / 6
        draw.rectangle((x0, cy - arm, x1, cy + arm), fill=255)
        draw.rectangle((cx - arm, y0, cx + arm, y1), fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(mask.reduce(ss), dtype=np.float32) / 255.0


def render_scene(scene: Scene, image_size: int = REFERENCE_SIZE) -> Image.Image:
    """Render `scene` as an RGB image; deterministic for a given scene."""
    image = _render_background(scene.background, image_size)
    for obj in scene.objects:
        alpha = _shape_mask(obj, image_size)[..., None]
        image = image * (1.0 - alpha) + np.asarray(obj.rgb, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _name(obj: SceneObject, with_size: bool = False) -> str:
    words = f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"
    return _article(words)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_captions(scene: Scene) -> list[str]:
    """Every caption the demo's templates say of `scene` (7 or 8, lowercase), each naming the main
    object's colour and shape. All of them, not a sample: two scenes that agree on a caption's facts
    both carry it, so retrieval can count any image with the query's wording as a hit."""
    main, others = scene.main, list(scene.objects[1:])
    bg = scene.background.kind
    templates = [
        f"{_name(main, with_size=True)}",
        f"a picture of {_name(main)}",
        f"{_name(main)} on {_article(bg)} background",
    ]
    if not others:
        templates += [
            f"there is {_name(main)} in the image",
            f"an image with one {main.color} {main.shape}",
            f"a single large {main.color} {main.shape}",
            f"one {main.color} {main.shape} and nothing else",
        ]
    else:
        second = others[0]
        everything = _join([_name(o) for o in scene.objects])
        n_others = NUMBER_WORDS[len(others)]
        plural = "s" if len(others) > 1 else ""
        templates += [
            f"a picture of {_name(main, with_size=True)} {relation(main, second)} {_name(second, with_size=True)}",
            f"there is {everything}",
            f"{_name(main)} {relation(main, second)} {_name(second, with_size=True)}",
            f"{NUMBER_WORDS[len(scene.objects)]} shapes: {everything}",
            f"{_name(main)} with {n_others} smaller shape{plural}",
        ]
    return templates


def _qa(question: str, answer: str, answer_type: str) -> dict:
    # VQA-style annotations carry ten human answers; the synthetic ground truth is unanimous.
    return {"question": question, "answers": [answer] * 10, "answer_type": answer_type}


def scene_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """Questions with unambiguous answers: colour, shape, count, and position when there are two or more objects."""
    main, others = scene.main, scene.objects[1:]
    color_is_unique = sum(o.color == main.color for o in scene.objects) == 1
    color_ref = f"the {main.color} object" if color_is_unique else f"the large {main.color} object"
    color_question = rng.choice([f"what color is the {main.shape}?", f"what is the color of the {main.shape}?"])
    shape_question = rng.choice([f"what shape is {color_ref}?", f"what is the shape of {color_ref}?"])
    count_question = rng.choice(["how many shapes are there?", "how many objects are in the picture?"])
    qa = [
        _qa(color_question, main.color, "color"),
        _qa(shape_question, main.shape, "shape"),
        _qa(count_question, str(len(scene.objects)), "number"),  # digits, as VQAv2's answers
    ]
    if others:
        second = others[0]
        true_relation = relation(main, second)
        # Ask about the true relation or its opposite on the same axis, so yes and no are equally likely.
        axis = RELATIONS[:2] if true_relation in RELATIONS[:2] else RELATIONS[2:]
        asked = rng.choice(axis)
        answer = "yes" if asked == true_relation else "no"
        qa.append(_qa(f"is the {main.shape} {asked} the {second.shape}?", answer, "position"))
        qa.append(_qa(f"what color is the {second.shape}?", second.color, "color"))
    return qa
