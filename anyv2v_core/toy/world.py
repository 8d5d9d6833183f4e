"""A seeded toy world of short videos: one to three squares or discs moving at constant velocity
and bouncing off the walls, over a plain or gradient background, with a caption.

Everything is derived from a `Scene` (a plain description) by `render`, so an edit of the first
frame is an edit of the scene: the edited first frame and the *ideal* edited video (same motion,
new look) come from the same renderer. The evaluation uses the per-object metadata (colour,
shape, size, per-frame centroid) to score generated videos.

Layouts: frames are float32 numpy arrays [F, H, W, 3] in 0..1; centroids are (x, y) in pixels,
pixel centres at integer + 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("square", "disc")
# Eight compass words for the caption, counter-clockwise from +x (image y points down).
_DIRECTIONS = ("right", "up and to the right", "up", "up and to the left", "left", "down and to the left",
               "down", "down and to the right")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str  # "square" or "disc"
    colour: str  # a key of COLOURS
    size: float  # side of the square / diameter of the disc, pixels
    start: tuple[float, float]  # centre (x, y) at frame 0, pixels
    velocity: tuple[float, float]  # pixels per frame before bouncing

    @property
    def rgb(self) -> tuple[float, float, float]:
        return COLOURS[self.colour]


@dataclass(frozen=True)
class Background:
    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]  # equal to colour_a for a plain background
    angle: float  # direction of the gradient, radians


@dataclass(frozen=True)
class Scene:
    size: int
    num_frames: int
    background: Background
    objects: tuple[ShapeSpec, ...]  # drawn in order: later objects cover earlier ones

    def centroids(self, index: int) -> np.ndarray:
        """Per-frame centre (x, y) of object `index`, [F, 2], after bouncing off the walls."""
        spec = self.objects[index]
        t = np.arange(self.num_frames, dtype=np.float64)
        half = spec.size / 2
        travel = self.size - spec.size  # the centre moves in [half, size - half]
        out = []
        for axis in range(2):
            # unfold the bounces: a triangle wave of period 2*travel
            position = np.mod(spec.start[axis] - half + spec.velocity[axis] * t, 2 * travel)
            position = np.where(position > travel, 2 * travel - position, position)
            out.append(position + half)
        return np.stack(out, axis=1).astype(np.float32)

    def caption(self) -> str:
        parts = [f"a {o.colour} {o.shape} moving {direction_word(o.velocity)}" for o in self.objects]
        return " and ".join(parts)


@dataclass(frozen=True)
class ObjectInfo:
    """What the evaluation needs to know about one object of a rendered video."""

    shape: str
    colour: str
    rgb: tuple[float, float, float]
    size: float
    centroids: np.ndarray  # [F, 2] (x, y) in pixels


def direction_word(velocity: tuple[float, float]) -> str:
    angle = math.atan2(-velocity[1], velocity[0])  # image y points down
    return _DIRECTIONS[round(angle / (math.pi / 4)) % 8]


def make_scene(seed: int, *, size: int = 64, num_frames: int = 8, max_objects: int = 3) -> Scene:
    """The scene of clip `seed`: all randomness comes from a numpy Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    dim = rng.uniform(0.15, 0.45, size=3)  # muted background colours keep the shapes distinct
    if rng.random() < 0.5:
        background = Background(tuple(dim), tuple(dim), 0.0)
    else:
        other = np.clip(dim + rng.uniform(-0.25, 0.25, size=3), 0.05, 0.6)
        background = Background(tuple(dim), tuple(other), float(rng.uniform(0, 2 * math.pi)))
    count = int(rng.integers(1, max_objects + 1))
    colour_names = rng.permutation(list(COLOURS))[:count]  # distinct colours: objects stay identifiable
    objects = []
    for colour in colour_names:
        shape_size = float(rng.uniform(10, 18))
        speed = float(rng.uniform(1.5, 4.0))
        heading = float(rng.uniform(0, 2 * math.pi))
        start = tuple(float(v) for v in rng.uniform(shape_size / 2, size - shape_size / 2, size=2))
        objects.append(ShapeSpec(
            shape=str(rng.choice(SHAPES)), colour=str(colour), size=shape_size, start=start,
            velocity=(speed * math.cos(heading), speed * math.sin(heading)),
        ))
    return Scene(size=size, num_frames=num_frames, background=background, objects=tuple(objects))


# The flow world of the toy Wan (`wan_train.py`): one shape on a plain background, its velocity
# drawn from a small set (8 headings x 2 speeds), so a model given only the first frame has to
# pick one of 16 motions and only the source video can tell it which.
FLOW_SIZE, FLOW_FRAMES = 32, 9
FLOW_SPEEDS = (0.75, 1.5)  # pixels per frame
FLOW_HEADINGS = 8  # directions, every 45 degrees


def make_flow_scene(seed: int, *, size: int = FLOW_SIZE, num_frames: int = FLOW_FRAMES) -> Scene:
    """The one-shape scene of flow-world clip `seed` (all randomness from a Generator seeded with `seed`)."""
    rng = np.random.default_rng(seed)
    grey = rng.uniform(0.15, 0.45, size=3)
    shape_size = float(rng.uniform(0.22, 0.34) * size)
    speed = FLOW_SPEEDS[int(rng.integers(len(FLOW_SPEEDS)))]
    heading = 2 * math.pi * int(rng.integers(FLOW_HEADINGS)) / FLOW_HEADINGS
    start = tuple(float(v) for v in rng.uniform(shape_size / 2, size - shape_size / 2, size=2))
    spec = ShapeSpec(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), size=shape_size,
                     start=start, velocity=(speed * math.cos(heading), speed * math.sin(heading)))
    return Scene(size=size, num_frames=num_frames, background=Background(tuple(grey), tuple(grey), 0.0),
                 objects=(spec,))


def _coverage(spec: ShapeSpec, centre: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage [H, W] in 0..1 of one shape centred at `centre` (x, y)."""
    pixels = np.arange(size, dtype=np.float32)
    half = spec.size / 2
    if spec.shape == "square":  # exact area of each pixel square inside the shape
        cover_x = np.clip(np.minimum(pixels + 1, centre[0] + half) - np.maximum(pixels, centre[0] - half), 0, 1)
        cover_y = np.clip(np.minimum(pixels + 1, centre[1] + half) - np.maximum(pixels, centre[1] - half), 0, 1)
        return cover_y[:, None] * cover_x[None, :]
    dx = pixels[None, :] + 0.5 - centre[0]
    dy = pixels[:, None] + 0.5 - centre[1]
    return np.clip(half - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)  # one-pixel soft edge


def render(scene: Scene) -> np.ndarray:
    """Frames [F, H, W, 3] float32 in 0..1."""
    size, bg = scene.size, scene.background
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = math.cos(bg.angle) * grid[None, :] + math.sin(bg.angle) * grid[:, None]  # [H, W] in ~-0.7..0.7
    ramp = np.clip(ramp / math.sqrt(2) + 0.5, 0, 1)[..., None]
    background = (1 - ramp) * np.array(bg.colour_a, np.float32) + ramp * np.array(bg.colour_b, np.float32)
    frames = np.repeat(background[None], scene.num_frames, axis=0).astype(np.float32)
    for index, spec in enumerate(scene.objects):
        rgb = np.array(spec.rgb, np.float32)
        for f, centre in enumerate(scene.centroids(index)):
            alpha = _coverage(spec, centre, size)[..., None]
            frames[f] = (1 - alpha) * frames[f] + alpha * rgb
    return frames


def object_info(scene: Scene) -> list[ObjectInfo]:
    return [ObjectInfo(o.shape, o.colour, o.rgb, o.size, scene.centroids(i)) for i, o in enumerate(scene.objects)]


def generate(seed: int, *, size: int = 64, num_frames: int = 8, max_objects: int = 3):
    """(frames [F, H, W, 3] float32 0..1, caption, per-object metadata) of clip `seed`."""
    scene = make_scene(seed, size=size, num_frames=num_frames, max_objects=max_objects)
    return render(scene), scene.caption(), object_info(scene)


# ---------------------------------------------------------------------------------------------- edits


def recolour(scene: Scene, index: int, colour: str) -> Scene:
    """The scene with object `index` in another colour (same shape, size and motion)."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    return _replace_object(scene, index, replace(scene.objects[index], colour=colour))


def swap_shape(scene: Scene, index: int) -> Scene:
    """The scene with object `index` turned from square to disc or back."""
    spec = scene.objects[index]
    return _replace_object(scene, index, replace(spec, shape="disc" if spec.shape == "square" else "square"))


def unused_colour(scene: Scene, index: int) -> str:
    """A colour no object of the scene has, picked deterministically from the object's own."""
    taken = {o.colour for o in scene.objects}
    names = list(COLOURS)
    start = names.index(scene.objects[index].colour)
    return next(names[(start + k) % len(names)] for k in range(1, len(names)) if names[(start + k) % len(names)] not in taken)


def edited_first_frame(scene: Scene) -> np.ndarray:
    """Frame 0 [H, W, 3] of an (edited) scene: what a user would paint in an image editor."""
    return render(replace(scene, num_frames=1))[0]


def _replace_object(scene: Scene, index: int, spec: ShapeSpec) -> Scene:
    objects = list(scene.objects)
    objects[index] = spec
    return replace(scene, objects=tuple(objects))
