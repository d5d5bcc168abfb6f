"""Contact sheets: images in a grid with a label under each (the demo, sampling jobs and notebooks use it)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

CELL = 128  # pixels per image in the grid


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int, cell: int = CELL) -> Image.Image:
    """Images upscaled to cell x cell (nearest neighbour, so pixels stay visible) with a wrapped label under each."""
    font = ImageFont.load_default()
    label_height = 30
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * cell, (index // columns) * (cell + label_height)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + cell + 1), _wrap(label, draw, font, cell - 4), fill="black", font=font)
    return grid


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return "\n".join(lines[:2])
