"""The sampling figures: an arm's prompts x seeds grid, and two arms side by side on the same
prompts and seed (rule compare_samples). PIL only."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sidpipe.io import SidpipeError, atomic_file, read_csv


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def make_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str] | None = None,
    tile: int = 128,
    label_width: int = 200,
    header: int = 16,
) -> Image.Image:
    """Rows of tiles (each resized to `tile` px) with a wrapped text label left of each row and
    optional column labels on top. Size: (label_width + cols*tile, header? + rows*tile)."""
    if len(images) != len(row_labels):
        raise SidpipeError(f"{len(images)} rows of images but {len(row_labels)} row labels")
    cols = max((len(row) for row in images), default=0)
    top = header if col_labels else 0
    grid = Image.new("RGB", (label_width + cols * tile, top + len(images) * tile), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    chars = max(8, label_width // 6)  # the default bitmap font is about 6 px per character
    for c, label in enumerate(col_labels or []):
        draw.text((label_width + c * tile + 2, 2), label, fill="black", font=font)
    for r, (row, label) in enumerate(zip(images, row_labels, strict=True)):
        y = top + r * tile
        lines = textwrap.wrap(label, chars)[: max(1, tile // 12)]
        draw.multiline_text((4, y + 4), "\n".join(lines), fill="black", font=font, spacing=2)
        for c, image in enumerate(row):
            tile_image = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
            grid.paste(tile_image, (label_width + c * tile, y))
    return grid


def _open(path: Path) -> Image.Image:
    with Image.open(path) as handle:
        return handle.convert("RGB")


def write_grids(
    out_dir: Path,
    manifest_rows: list[dict],
    grid_path: Path,
    seeds_shown: int = 4,
    tile: int = 128,
) -> Image.Image:
    """Prompts (rows, labelled) x the first `seeds_shown` seeds (columns) of an arm's images."""
    out_dir = Path(out_dir)
    by_prompt: dict[int, dict[int, dict]] = {}
    for row in manifest_rows:
        by_prompt.setdefault(int(row["prompt_id"]), {})[int(row["seed"])] = row
    seeds = sorted({int(row["seed"]) for row in manifest_rows})[:seeds_shown]
    images, labels = [], []
    for prompt_id in sorted(by_prompt):
        rows = by_prompt[prompt_id]
        images.append([_open(out_dir / rows[s]["path"]) for s in seeds if s in rows])
        labels.append(f"{prompt_id:02d} {next(iter(rows.values()))['prompt']}")
    grid = make_grid(images, labels, [f"seed {s}" for s in seeds], tile=tile)
    with atomic_file(grid_path, "wb") as handle:
        grid.save(handle, format="PNG")
    return grid


def _manifest_or_names(folder: Path) -> dict[tuple[int, int], dict]:
    path = folder / "manifest.csv"
    if not path.is_file():
        raise SidpipeError(f"{path} does not exist; run sampling for that arm first")
    return {(int(r["prompt_id"]), int(r["seed"])): r for r in read_csv(path)}


def write_side_by_side(
    baseline_dir: Path,
    sid_dir: Path,
    out_path: Path,
    prompt_ids: list[int],
    seed: int,
    tile: int = 128,
    labels: tuple[str, str] = ("baseline", "SID"),
) -> Image.Image:
    """Baseline vs SID images of the same prompts and seed: one row per prompt, two columns."""
    baseline, sid = _manifest_or_names(Path(baseline_dir)), _manifest_or_names(Path(sid_dir))
    images, row_labels = [], []
    for prompt_id in prompt_ids:
        key = (int(prompt_id), int(seed))
        if key not in baseline or key not in sid:
            raise SidpipeError(f"prompt {prompt_id}, seed {seed} is missing from an arm's manifest")
        images.append(
            [
                _open(Path(baseline_dir) / baseline[key]["path"]),
                _open(Path(sid_dir) / sid[key]["path"]),
            ]
        )
        row_labels.append(f"{prompt_id:02d} {sid[key].get('prompt_plain') or sid[key]['prompt']}")
    grid = make_grid(images, row_labels, list(labels), tile=tile)
    with atomic_file(out_path, "wb") as handle:
        grid.save(handle, format="PNG")
    return grid
