"""The scenes data set's pictures: groups of textured tokens on a floor in front of a wall.

A second generated data set, built to differ from the demo (`demo_scenes`) in
everything a captioner could overfit to: the picture is 320x240 (4:3, so the
features stage resizes it) instead of 299x299; the backdrop is a wall above a
wooden, tiled or carpeted floor instead of a textured grey field; the objects
are crosses, diamonds, hexagons, arrows and rings in orange, pink, cyan,
brown, white or black, plain or striped, spotted or checkered, instead of the
demo's shapes and colours; and they come in groups of one to three identical
tokens placed anywhere (not on a 3x3 grid), so captions count them and relate
groups to each other. `sample_scene` draws the groups and `render_scene`
paints them, with the helpers it shares with the demo (`captioning.data.drawing`).
Every random choice comes from the generator passed in, so a seed gives the
same picture everywhere.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageFilter

from captioning.data.drawing import add_grain, pick, token_mask

WIDTH, HEIGHT = 320, 240
KINDS = ("cross", "diamond", "hexagon", "arrow", "ring")
COLOURS = ("orange", "pink", "cyan", "brown", "white", "black")
TEXTURES = ("plain", "striped", "spotted", "checkered")
FLOORS = ("wooden", "tiled", "carpet")
MAX_OBJECTS = 5
FILL_RGB = {
    "orange": (240, 135, 25),
    "pink": (240, 125, 185),
    "cyan": (35, 200, 215),
    "brown": (125, 75, 35),
    "white": (238, 238, 238),
    "black": (28, 28, 28),
}
_RADIUS = (15.0, 30.0)
_GAP = 4.0  # pixels between two tokens' enclosing circles
_PERIOD = 6  # pattern period in pixels (stripes, spots, checks)


def _outline(kind: str, radius: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons [m, 2] of one token around the origin: the outline, then any holes."""
    r = radius
    turn = math.radians(rng.uniform(-15, 15))
    if kind == "cross":
        a, b = 0.32 * r, r
        points = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b),
                  (-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]  # fmt: skip
    elif kind == "diamond":
        points = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
    elif kind == "hexagon":
        points = [(r * math.cos(t), r * math.sin(t)) for t in np.arange(6) * np.pi / 3]
    elif kind == "arrow":
        side = 1 if rng.random() < 0.5 else -1  # pointing right or left
        points = [(side * x, y) for x, y in ((-r, -0.25 * r), (0.2 * r, -0.25 * r),
                  (0.2 * r, -0.7 * r), (r, 0), (0.2 * r, 0.7 * r), (0.2 * r, 0.25 * r),
                  (-r, 0.25 * r))]  # fmt: skip
    else:  # ring: an outer and an inner circle
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circle = np.stack([np.cos(angles), np.sin(angles)], 1)
        return [r * circle, 0.55 * r * circle]
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    return [np.asarray(points, dtype=np.float64) @ rotation.T]


def _place(radii: list[float], rng: np.random.Generator) -> np.ndarray | None:
    """Centres [n, 2] for tokens of these radii, inside the picture, none overlapping."""
    centres: list[np.ndarray] = []
    for r in radii:
        for _ in range(200):
            c = rng.uniform((r + 2, r + 2), (WIDTH - r - 2, HEIGHT - r - 2))
            if all(np.hypot(*(c - o)) > r + s + _GAP for o, s in zip(centres, radii, strict=False)):
                centres.append(c)
                break
        else:
            return None
    return np.asarray(centres)


def sample_scene(rng: np.random.Generator) -> dict:
    """{floor, groups, objects}: one to three groups of identical tokens, five tokens at most.

    A group is {kind, colour, texture, count}, no two groups alike in kind and
    colour; each object is {kind, colour, texture, group, polygons, bbox}.
    """
    while True:
        n_groups = int(rng.integers(1, 4))
        counts = [int(rng.integers(1, 4)) for _ in range(n_groups)]
        if sum(counts) <= MAX_OBJECTS:
            break
    groups: list[dict] = []
    while len(groups) < n_groups:
        kind, colour = pick(rng, KINDS), pick(rng, COLOURS)
        if all((g["kind"], g["colour"]) != (kind, colour) for g in groups):
            texture = pick(rng, TEXTURES)
            groups.append({"kind": kind, "colour": colour, "texture": texture,
                           "count": counts[len(groups)]})  # fmt: skip
    members = [i for i, g in enumerate(groups) for _ in range(g["count"])]
    size = rng.uniform(*_RADIUS, len(groups))  # tokens of a group share a size, roughly
    radii = [float(size[i] * rng.uniform(0.92, 1.08)) for i in members]
    centres = None
    while centres is None:
        centres = _place(radii, rng)
    objects = []
    for i, r, centre in zip(members, radii, centres, strict=True):
        polygons = [p + centre for p in _outline(groups[i]["kind"], r, rng)]
        x0, y0 = polygons[0].min(0)
        w, h = polygons[0].max(0) - polygons[0].min(0)
        objects.append({
            **{k: groups[i][k] for k in ("kind", "colour", "texture")},
            "group": i,
            "polygons": polygons,
            "bbox": [round(float(v), 2) for v in (x0, y0, w, h)],
        })  # fmt: skip
    return {"floor": pick(rng, FLOORS), "groups": groups, "objects": objects}


def _backdrop(floor: str, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float32 wall above a floor of the given kind, muted so tokens stand out."""
    horizon = int(HEIGHT * rng.uniform(0.3, 0.5))
    wall = rng.uniform(95, 165) + rng.normal(0, 12, 3)
    base = rng.uniform(80, 150) + rng.normal(0, 15, 3)
    img = np.empty((HEIGHT, WIDTH, 3), np.float32)
    rows = np.arange(HEIGHT, dtype=np.float32)[:, None]
    img[:horizon] = wall + 10 * (rows[:horizon] / horizon - 0.5)[..., None]
    yy, xx = np.mgrid[horizon:HEIGHT, 0:WIDTH].astype(np.float32)
    if floor == "wooden":  # planks running across, each its own shade, with grain
        plank = (yy - horizon) // rng.uniform(14, 22)
        shade = rng.normal(0, 12, int(plank.max()) + 1)[plank.astype(int)]
        grain = 6 * np.sin(xx / rng.uniform(3, 7) + 3 * np.sin(yy / 5))
        light = shade + grain
    elif floor == "tiled":  # a checkerboard of two tones
        side = rng.uniform(18, 30)
        light = np.where(((xx // side + (yy - horizon) // side) % 2) == 0, 14.0, -14.0)
    else:  # carpet: fine noise
        light = rng.normal(0, 9, xx.shape)
    img[horizon:] = base + light[..., None]
    img[horizon : horizon + 2] *= 0.7  # the skirting line
    return img


def _pattern(texture: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean [h, w]: where the token's texture is drawn in its contrast tone."""
    if texture == "striped":
        return ((xx + yy).astype(int) // (_PERIOD // 2)) % 2 == 0
    if texture == "spotted":
        return (np.hypot(xx % _PERIOD - _PERIOD / 2, yy % _PERIOD - _PERIOD / 2)) < 1.6
    if texture == "checkered":
        return ((xx.astype(int) // _PERIOD + yy.astype(int) // _PERIOD) % 2) == 0
    return np.zeros(xx.shape, bool)


def _paint(img: np.ndarray, obj: dict, rng: np.random.Generator) -> None:
    """Draw one token (shadow, shaded fill, texture, anti-aliased edge) into img in place."""
    (x0, y0, x1, y1), mask = token_mask(obj["polygons"], 6, WIDTH, HEIGHT, supersample=3)
    alpha = np.asarray(mask, np.float32)[..., None] / 255  # (h, w, 1)
    shadow = np.asarray(mask.filter(ImageFilter.GaussianBlur(2.0)), np.float32) / 255
    shadow = np.roll(shadow, (3, 2), axis=(0, 1))
    patch = img[y0:y1, x0:x1]  # a view
    patch *= 1 - 0.35 * shadow[..., None]
    colour = np.array(FILL_RGB[obj["colour"]], np.float32) + rng.normal(0, 7, 3)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ramp = (yy - (y0 + y1) / 2) / max(y1 - y0, 1)  # lit from above
    fill = colour * (1 - 0.2 * ramp[..., None])
    contrast = np.array((150.0, 150.0, 150.0)) if obj["colour"] == "black" else colour * 0.35
    fill[_pattern(obj["texture"], xx, yy)] = contrast
    patch[...] = patch * (1 - alpha) + fill * alpha


def render_scene(scene: dict, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] uint8 picture of a `sample_scene` scene."""
    img = _backdrop(scene["floor"], rng)
    for obj in scene["objects"]:
        _paint(img, obj, rng)
    return add_grain(img, rng, 6, 12)
