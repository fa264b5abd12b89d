"""Render a `Scene` into an RGB image and its subject mask (numpy + PIL, deterministic).

Scenes are drawn at twice the output size and box-downsampled, so edges are anti-aliased the
same way every time. The subject mask is the subject's own silhouette (no hat, no element).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sidpipe.world.grammar import COLOURS, Element, Scene, Subject

SUPERSAMPLE = 2
GROUND = 0.82  # where the subject stands, as a fraction of the height


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in rgb)


# --- backgrounds (numpy, S x S x 3 float in 0..255) --------------------------------------------


def _fill(s: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), (s, s, 3)).copy()


def _sky_ground(s: int, sky, ground, horizon: float) -> np.ndarray:
    img = _fill(s, ground)
    img[: int(horizon * s)] = sky
    return img


def _noise(rng: np.random.Generator, s: int, amount: float) -> np.ndarray:
    return rng.normal(0.0, amount, (s, s, 1)).astype(np.float32)


def background_array(name: str, s: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    if name == "jungle":
        img = _fill(s, (24, 92, 34))
        img *= (0.85 + 0.3 * (np.sin(xx * 40 + rng.uniform(0, 6)) > 0.6))[..., None]
        for _ in range(26):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.11)
            leaf = ((xx - cx) / r) ** 2 + ((yy - cy) / (r * 0.55)) ** 2 < 1
            img[leaf] = (40 + rng.integers(30), 130 + rng.integers(50), 40 + rng.integers(20))
    elif name == "beach":
        img = _sky_ground(s, (130, 196, 242), (232, 206, 142), 0.42)
        img[int(0.42 * s) : int(0.52 * s)] = (44, 124, 204)
        img[int(0.52 * s) :] += _noise(rng, s, 6)[int(0.52 * s) :]
    elif name == "snow":
        img = _sky_ground(s, (196, 202, 214), (246, 247, 252), 0.45)
        img[int(0.45 * s) :] -= (yy[int(0.45 * s) :, :, None] - 0.45) * 30
        for _ in range(40):
            x, y = rng.integers(s), rng.integers(s)
            img[y, x] = 255
    elif name == "city":
        img = _sky_ground(s, (150, 172, 204), (70, 70, 76), 0.78)
        x = 0.0
        while x < 1:
            w, top = rng.uniform(0.12, 0.22), rng.uniform(0.12, 0.45)
            grey = rng.uniform(90, 140)
            box = (xx >= x) & (xx < x + w - 0.01) & (yy >= top) & (yy < 0.78)
            img[box] = grey
            win = box & ((xx - x) * s % 6 < 2.5) & ((yy * s) % 7 < 3) & (yy > top + 0.03)
            img[win] = (240, 214, 90)
            x += w
    elif name == "grass":
        img = _sky_ground(s, (150, 202, 246), (72, 160, 58), 0.45)
        blades = (yy > 0.45) & (np.sin(xx * 90 + yy * 20) > 0.7)
        img[blades] = (52, 128, 44)
    elif name == "water":
        img = _fill(s, (32, 104, 194))
        waves = np.sin(xx * 26 + np.sin(yy * 30) * 2 + rng.uniform(0, 6)) * np.sin(yy * 48)
        img[waves > 0.55] = (120, 180, 236)
    elif name == "tablecloth":
        img = _sky_ground(s, (236, 226, 204), (240, 240, 240), 0.3)
        cell = s // 8
        checks = (((xx * s) // cell + (yy * s) // cell) % 2 == 0) & (yy >= 0.3)
        img[checks] = (208, 40, 40)
    elif name == "brick wall":
        img = _sky_ground(s, (184, 180, 170), (118, 118, 112), 0.8)
        row_h, brick_w = s // 8, s // 4
        rows = (yy * s) // row_h
        offset = (rows % 2) * (brick_w // 2)
        mortar = ((yy * s) % row_h < 1.5) | (((xx * s) + offset) % brick_w < 1.5)
        brick = (yy < 0.8) & ~mortar
        img[brick] = (164, 64, 44)
        img[brick] += _noise(rng, s, 8)[brick]
    elif name == "wooden floor":
        img = _sky_ground(s, (232, 226, 214), (146, 94, 52), 0.35)
        plank = ((yy * s) // (s // 10)) % 2 == 0
        img[(yy >= 0.35) & plank] = (122, 76, 40)
        img[(yy >= 0.35) & ((yy * s) % (s // 10) < 1)] = (80, 48, 26)
    elif name == "night sky":
        img = _sky_ground(s, (16, 22, 64), (34, 34, 44), 0.84)
        for _ in range(30):
            x, y = rng.integers(s), rng.integers(int(0.8 * s))
            img[y, x] = (255, 250, 210)
    elif name == "pink fabric":
        img = _fill(s, (240, 168, 200))
        folds = np.sin((xx + yy) * 14 + rng.uniform(0, 6))
        img *= (0.9 + 0.1 * folds)[..., None]
    elif name == "dirt road":
        img = _sky_ground(s, (150, 200, 240), (152, 112, 70), 0.4)
        for track in (0.35, 0.65):
            line = (yy > 0.4) & (np.abs(xx - (0.5 + (track - 0.5) * (yy - 0.3) * 1.6)) < 0.03)
            img[line] = (110, 78, 46)
    elif name == "wheat field":
        img = _sky_ground(s, (140, 194, 240), (222, 182, 64), 0.36)
        stalks = (yy > 0.36) & (np.sin(xx * 120) > 0.4)
        img[stalks] = (190, 146, 40)
    elif name == "mountain":
        img = _sky_ground(s, (142, 192, 240), (96, 130, 84), 0.78)
        for cx, h in ((rng.uniform(0.1, 0.4), 0.5), (rng.uniform(0.6, 0.9), 0.42)):
            peak = 0.78 - h
            inside = (yy > peak + np.abs(xx - cx) * 1.3) & (yy < 0.78)
            img[inside] = (112, 112, 124)
            img[inside & (yy < peak + 0.1)] = (246, 246, 250)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


# --- the subject -------------------------------------------------------------------------------


class _Layer:
    """RGBA drawing of one thing, with a separate silhouette mask."""

    def __init__(self, s: int) -> None:
        self.image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)
        self.body = Image.new("L", (s, s), 0)  # where the pattern goes
        self.body_draw = ImageDraw.Draw(self.body)

    def part(self, shape: str, box, fill, body: bool = False, **kw) -> None:
        getattr(self.draw, shape)(box, fill=(*fill, 255), **kw)
        if body:
            getattr(self.body_draw, shape)(box, fill=255, **kw)


def _subject_layer(subject: Subject, s: int, cx: float, scale: float) -> tuple[_Layer, tuple]:
    """Draw the subject facing right, upright; return the layer and its head point."""
    layer = _Layer(s)
    colour = COLOURS[subject.colour]
    dark = _shade(colour, 0.6)
    u = s * 0.42 * scale  # the subject's nominal size in pixels
    gx, gy = cx * s, GROUND * s
    cls = subject.cls
    if cls == "mug":
        w, h = 0.62 * u, 0.72 * u
        x0, y0 = gx - w / 2, gy - h
        layer.part(
            "ellipse",
            (x0 + w - 0.12 * u, y0 + 0.16 * h, x0 + w + 0.3 * u, y0 + 0.72 * h),
            dark,
            width=max(2, int(0.1 * u)),
        )
        layer.draw.ellipse(
            (x0 + w - 0.12 * u, y0 + 0.16 * h, x0 + w + 0.3 * u, y0 + 0.72 * h),
            outline=(*colour, 255),
            width=max(2, int(0.1 * u)),
            fill=None,
        )
        layer.part("rectangle", (x0, y0, x0 + w, gy), colour, body=True)
        layer.part("rectangle", (x0, y0, x0 + w, y0 + 0.06 * u), _shade(colour, 0.8))
        head = (gx, y0)
    elif cls == "robot":
        w, h = 0.6 * u, 0.5 * u
        x0, y0 = gx - w / 2, gy - 0.12 * u - h
        for lx in (x0 + 0.12 * u, x0 + w - 0.22 * u):
            layer.part("rectangle", (lx, gy - 0.14 * u, lx + 0.1 * u, gy), (90, 90, 96))
        layer.part("rectangle", (x0, y0, x0 + w, y0 + h), colour, body=True)
        hw = 0.4 * u
        hx0, hy0 = gx - hw / 2, y0 - 0.36 * u
        layer.part("rectangle", (hx0, hy0, hx0 + hw, y0 - 0.02 * u), (160, 164, 170))
        for ex in (hx0 + 0.08 * u, hx0 + hw - 0.16 * u):
            layer.part(
                "rectangle", (ex, hy0 + 0.1 * u, ex + 0.08 * u, hy0 + 0.18 * u), (30, 30, 30)
            )
        layer.part("line", (gx, hy0, gx, hy0 - 0.14 * u), (90, 90, 96), width=max(1, int(0.05 * u)))
        head = (gx, hy0)
    elif cls == "dog":
        w, h = 0.8 * u, 0.36 * u
        x0, y0 = gx - w / 2, gy - 0.22 * u - h
        for lx in (x0 + 0.08 * u, x0 + 0.22 * u, x0 + w - 0.3 * u, x0 + w - 0.16 * u):
            layer.part("rectangle", (lx, y0 + h - 0.05 * u, lx + 0.09 * u, gy), dark)
        layer.part(
            "line",
            (x0 + 0.02 * u, y0 + 0.1 * u, x0 - 0.16 * u, y0 - 0.12 * u),
            dark,
            width=max(2, int(0.07 * u)),
        )
        layer.part("ellipse", (x0, y0, x0 + w, y0 + h), colour, body=True)
        hr = 0.2 * u
        hx, hy = x0 + w - 0.02 * u, y0 - 0.06 * u
        layer.part("ellipse", (hx - hr, hy - hr, hx + hr, hy + hr), colour, body=True)
        layer.part(
            "polygon",
            [
                (hx - 0.18 * u, hy - 0.1 * u),
                (hx - 0.06 * u, hy - 0.3 * u),
                (hx - 0.02 * u, hy - 0.08 * u),
            ],
            dark,
        )
        layer.part(
            "ellipse", (hx + 0.12 * u, hy - 0.02 * u, hx + 0.26 * u, hy + 0.1 * u), (30, 30, 30)
        )
        head = (hx, hy - hr)
    elif cls == "car":
        w, h = 1.0 * u, 0.3 * u
        x0, y0 = gx - w / 2, gy - 0.12 * u - h
        layer.part(
            "polygon",
            [
                (x0 + 0.18 * w, y0),
                (x0 + 0.3 * w, y0 - 0.26 * u),
                (x0 + 0.66 * w, y0 - 0.26 * u),
                (x0 + 0.82 * w, y0),
            ],
            colour,
            body=True,
        )
        layer.part(
            "polygon",
            [
                (x0 + 0.34 * w, y0 - 0.02 * u),
                (x0 + 0.38 * w, y0 - 0.2 * u),
                (x0 + 0.62 * w, y0 - 0.2 * u),
                (x0 + 0.72 * w, y0 - 0.02 * u),
            ],
            (190, 226, 246),
        )
        layer.part("rectangle", (x0, y0, x0 + w, y0 + h), colour, body=True)
        layer.part(
            "rectangle", (x0 + w - 0.08 * u, y0 + 0.06 * u, x0 + w, y0 + 0.14 * u), (250, 236, 120)
        )
        r = 0.14 * u
        for wx in (x0 + 0.22 * w, x0 + 0.78 * w):
            layer.part("ellipse", (wx - r, gy - 2 * r, wx + r, gy), (28, 28, 28))
        head = (gx, y0 - 0.26 * u)
    elif cls == "ball":
        r = 0.4 * u
        layer.part("ellipse", (gx - r, gy - 2 * r, gx + r, gy), colour, body=True)
        head = (gx, gy - 2 * r)
    elif cls == "lamp":
        layer.part("ellipse", (gx - 0.3 * u, gy - 0.1 * u, gx + 0.3 * u, gy), (70, 70, 76))
        layer.part(
            "rectangle", (gx - 0.04 * u, gy - 0.62 * u, gx + 0.04 * u, gy - 0.05 * u), (70, 70, 76)
        )
        top, bottom = gy - 1.0 * u, gy - 0.55 * u
        layer.part(
            "polygon",
            [
                (gx - 0.2 * u, top),
                (gx + 0.2 * u, top),
                (gx + 0.4 * u, bottom),
                (gx - 0.4 * u, bottom),
            ],
            colour,
            body=True,
        )
        head = (gx, top)
    else:
        raise ValueError(f"unknown subject class {cls!r}")
    _apply_pattern(layer, subject, s)
    return layer, head


def _apply_pattern(layer: _Layer, subject: Subject, s: int) -> None:
    if subject.pattern == "plain" or subject.accent is None:
        return
    body = np.asarray(layer.body) > 127
    if not body.any():
        return
    ys, xs = np.nonzero(body)
    yy, xx = np.mgrid[0:s, 0:s]
    # Coarse enough to survive the VAE and be read at 32 px: 3 px stripes, 5 px spots.
    period = max(4, s // 5)
    if subject.pattern == "striped":
        paint = ((yy - ys.min()) % period) < period / 2
    elif subject.pattern == "spotted":
        cell = max(6, s // 4)
        row = (yy - ys.min()) // cell
        fy = (yy - ys.min()) % cell
        fx = (xx - xs.min() + (row % 2) * cell // 2) % cell
        paint = (fy - cell / 2) ** 2 + (fx - cell / 2) ** 2 < (cell * 0.32) ** 2
    elif subject.pattern == "two-tone":
        paint = yy < (ys.min() + ys.max()) / 2
    else:
        raise ValueError(f"unknown pattern {subject.pattern!r}")
    rgba = np.asarray(layer.image).copy()
    rgba[body & paint, :3] = COLOURS[subject.accent]
    layer.image = Image.fromarray(rgba, "RGBA")
    layer.draw = ImageDraw.Draw(layer.image)


def _hat(draw: ImageDraw.ImageDraw, head: tuple[float, float], u: float, colour: str) -> None:
    hx, hy = head
    rgb = COLOURS[colour]
    draw.rectangle((hx - 0.2 * u, hy - 0.05 * u, hx + 0.2 * u, hy + 0.02 * u), fill=(*rgb, 255))
    draw.rectangle(
        (hx - 0.12 * u, hy - 0.28 * u, hx + 0.12 * u, hy - 0.04 * u), fill=(*_shade(rgb, 0.8), 255)
    )


# --- elements ----------------------------------------------------------------------------------


def _draw_element(
    draw: ImageDraw.ImageDraw, element: Element, s: int, cx: float, top: tuple[float, float]
) -> None:
    rgb = COLOURS[element.colour]
    u = s * (0.24 if element.size == "small" else 0.32)
    gy = GROUND * s
    if element.side in ("left", "right"):
        sign = -1 if element.side == "left" else 1
        ex = min(max(cx + sign * 0.33, 0.14), 0.86) * s
    else:
        ex = cx * s
    kind = element.kind
    if kind == "plant":
        draw.polygon(
            [
                (ex - 0.35 * u, gy - 0.45 * u),
                (ex + 0.35 * u, gy - 0.45 * u),
                (ex + 0.25 * u, gy),
                (ex - 0.25 * u, gy),
            ],
            fill=rgb,
        )
        for dx, dy, r in ((0, -1.0, 0.32), (-0.3, -0.78, 0.26), (0.3, -0.78, 0.26)):
            draw.ellipse(
                (
                    ex + dx * u - r * u,
                    gy + dy * u - r * u,
                    ex + dx * u + r * u,
                    gy + dy * u + r * u,
                ),
                fill=(34, 150, 48),
            )
    elif kind == "box":
        body = _shade((200, 150, 90), 1.0) if element.colour == "orange" else rgb
        draw.rectangle((ex - 0.45 * u, gy - 0.8 * u, ex + 0.45 * u, gy), fill=body)
        draw.rectangle(
            (ex - 0.45 * u, gy - 0.48 * u, ex + 0.45 * u, gy - 0.38 * u), fill=_shade(body, 0.7)
        )
    elif kind == "frisbee":
        draw.ellipse((ex - 0.5 * u, gy - 0.24 * u, ex + 0.5 * u, gy), fill=rgb)
        draw.ellipse(
            (ex - 0.3 * u, gy - 0.18 * u, ex + 0.3 * u, gy - 0.06 * u), fill=_shade(rgb, 0.75)
        )
    elif kind == "book":
        for i, shade in enumerate((1.0, 0.7, 0.85)):
            y1 = gy - i * 0.22 * u
            draw.rectangle(
                (ex - 0.45 * u + i * 0.04 * u, y1 - 0.2 * u, ex + 0.45 * u, y1),
                fill=_shade(rgb, shade),
            )
            draw.rectangle(
                (ex - 0.45 * u + i * 0.04 * u, y1 - 0.2 * u, ex - 0.3 * u, y1), fill=(236, 232, 220)
            )
    elif kind == "fence":
        rgb_f = _shade(rgb, 1.0)
        height = 0.5 * s * (0.7 if element.size == "small" else 1.0) * 0.8
        top_y, bottom_y = gy - height, gy - 0.02 * s
        draw.rectangle(
            (0, top_y + 0.25 * (bottom_y - top_y), s, top_y + 0.35 * (bottom_y - top_y)), fill=rgb_f
        )
        x = 0.02 * s
        while x < s:
            draw.polygon(
                [
                    (x, bottom_y),
                    (x, top_y + 0.06 * s),
                    (x + 0.035 * s, top_y),
                    (x + 0.07 * s, top_y + 0.06 * s),
                    (x + 0.07 * s, bottom_y),
                ],
                fill=rgb_f,
            )
            x += 0.12 * s
    elif kind == "balloon":
        tx, ty = top
        r = 0.5 * u * 0.6
        bx, by = min(tx + 0.16 * s, s - r - 1), max(ty - 0.2 * s, r + 1)
        draw.line((tx, ty, bx, by + r), fill=(60, 60, 60), width=max(1, s // 48))
        draw.ellipse((bx - r, by - r, bx + r, by + r), fill=rgb)
    else:
        raise ValueError(f"unknown element {kind!r}")


# --- the scene -------------------------------------------------------------------------------


def render(scene: Scene, size: int = 32, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """(RGB image, L mask 0/255 of the subject) at `size` px. `seed` only varies the texture."""
    s = size * SUPERSAMPLE
    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(
        np.clip(background_array(scene.background, s, rng), 0, 255).astype(np.uint8), "RGB"
    ).convert("RGBA")
    subject = scene.subject
    layer, head = _subject_layer(subject, s, scene.x, scene.scale)
    u = s * 0.42 * scale_of(scene)
    sub_img = layer.image
    if subject.facing == "left":
        sub_img = _mirror_about(sub_img, scene.x * s)
        head = (2 * scene.x * s - head[0], head[1])
    if subject.upside_down:
        sub_img, head = _flip_vertical(sub_img, head)
    mask = sub_img.getchannel("A")

    behind = [e for e in scene.elements if e.side == "behind"]
    front = [e for e in scene.elements if e.side in ("left", "right")]
    tied = [e for e in scene.elements if e.side == "tied"]
    draw = ImageDraw.Draw(canvas)
    for element in behind + front:
        _draw_element(draw, element, s, scene.x, head)
    canvas.alpha_composite(sub_img)
    draw = ImageDraw.Draw(canvas)
    if subject.hat and not subject.upside_down:
        _hat(draw, head, u, subject.hat)
    for element in tied:
        _draw_element(draw, element, s, scene.x, head)
    image = canvas.convert("RGB").resize((size, size), Image.Resampling.BOX)
    small = np.asarray(mask.resize((size, size), Image.Resampling.BOX))
    return image, Image.fromarray(np.where(small >= 128, 255, 0).astype(np.uint8), "L")


def scale_of(scene: Scene) -> float:
    return scene.scale


def _mirror_about(img: Image.Image, cx: float) -> Image.Image:
    """Mirror a layer left-right about the vertical line x = cx."""
    arr = np.asarray(img)
    s = arr.shape[1]
    xs = np.clip(np.round(2 * cx - 1 - np.arange(s)).astype(int), -1, s)
    out = np.zeros_like(arr)
    valid = (xs >= 0) & (xs < s)
    out[:, valid] = arr[:, xs[valid]]
    return Image.fromarray(out, "RGBA")


def _flip_vertical(img: Image.Image, head: tuple[float, float]) -> tuple[Image.Image, tuple]:
    """Turn the subject upside down in place: flip about the middle of its own height."""
    arr = np.asarray(img)
    rows = np.nonzero(arr[..., 3].any(axis=1))[0]
    if not len(rows):
        return img, head
    top, bottom = rows.min(), rows.max()
    out = np.zeros_like(arr)
    out[top : bottom + 1] = arr[top : bottom + 1][::-1]
    return Image.fromarray(out, "RGBA"), (head[0], float(bottom))
