"""Pictures for people: the loss curve and image grids (PIL only, no plotting library)."""
from __future__ import annotations

import math


def _smoothed(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(losses: list[float], width: int = 512, height: int = 256, title: str = "training loss"):
    """Per-step loss (light) and its running mean (dark) with the step and loss ranges written on the axes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 12, 22, height - 24
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((left, 4), title, fill=(0, 0, 0))
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((left + 8, top + 8), "no finite loss values", fill=(200, 0, 0))
        return image
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0

    def point(i, value):
        x = left + (right - left) * (i / max(len(losses) - 1, 1))
        y = bottom - (bottom - top) * ((value - low) / span)
        return x, y

    def polyline(values, colour, width_px):
        points = [point(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width_px)

    polyline(losses, (170, 200, 240), 1)
    polyline(_smoothed(losses, max(1, len(losses) // 20)), (20, 60, 160), 2)
    draw.text((4, top), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 6), f"step {len(losses)}", fill=(0, 0, 0))
    return image


def image_grid(images: list, captions: list[str] | None = None, columns: int | None = None, caption_height: int = 14,
               scale: int = 1):
    """Images (PIL, same size) in rows, each with an optional caption underneath.

    A row whose captions are all the same (one prompt, several seeds) gets it once, across the row.
    scale > 1 enlarges every image that many times (nearest neighbour), for small models' pictures.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    cell_height = height + (caption_height if captions else 0)
    grid = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    for index, picture in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * cell_height
        grid.paste(picture.convert("RGB"), (x, y))
    for row in range(rows if captions else 0):
        texts = captions[row * columns : (row + 1) * columns]
        y = row * cell_height + height + 1
        if len(set(texts)) == 1:
            draw.text((2, y), texts[0][: max(4, columns * width // 6)], fill=(0, 0, 0))
        else:
            for column, text in enumerate(texts):
                draw.text((column * width + 2, y), text[: max(4, width // 6)], fill=(0, 0, 0))
    return grid


def side_by_side(pictures: list, titles: list[str], title_height: int = 16, gap: int = 8):
    """Pictures (PIL) in one row, each under its title, on white."""
    from PIL import Image, ImageDraw

    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    row = Image.new("RGB", (width, title_height + max(p.height for p in pictures)), "white")
    draw, x = ImageDraw.Draw(row), 0
    for picture, title in zip(pictures, titles):
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        row.paste(picture.convert("RGB"), (x, title_height))
        x += picture.width + gap
    return row


def live_preview(losses: list[float], total_steps: int, sample, height: int = 256):
    """What a training run shows while it runs: the loss curve so far beside a sample drawn with the concept as it
    stands (scaled to the curve's height, nearest neighbour for small models' pictures)."""
    from PIL import Image, ImageDraw

    curve = loss_curve(losses, width=2 * height, height=height, title=f"step {len(losses)} of {total_steps}")
    scale = height / sample.height
    sample = sample.convert("RGB").resize((max(1, round(sample.width * scale)), height),
                                          Image.NEAREST if scale >= 2 else Image.BICUBIC)
    picture = Image.new("RGB", (curve.width + sample.width, height), "white")
    picture.paste(curve, (0, 0))
    picture.paste(sample, (curve.width, 0))
    ImageDraw.Draw(picture).text((curve.width + 4, 4), "now", fill=(255, 255, 255))
    return picture
