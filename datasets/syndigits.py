"""``syndigits``: digits rendered from matplotlib's bundled fonts, in the spirit of SynNumbers.

Ganin & Lempitsky (ICML 2015) rendered digits from Windows fonts with varied position, orientation,
stroke, colours and background to get a synthetic source for SVHN. Windows fonts are not in any
wheel, so this renders the 22 fonts matplotlib ships (the ones that draw all ten digits) with PIL:
random glyph height, rotation, stroke width, offset, foreground/background colours (a gradient
background with noise), blur, and sometimes cropped neighbouring digits at the sides, as in SVHN
house numbers. Rendered at 2x and downsampled (antialiasing) to uint8 3 x 28 x 28.

Fonts are split by font, not by image: test and val digits are drawn in fonts never seen in train
(``TRAIN_FONTS`` / ``VAL_FONTS`` / ``TEST_FONTS``), so accuracy on val/test measures generalisation
to unseen typefaces. The split is fixed (it ignores ``split_seed``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .base import DomainData, register_domain
from .cache import cached
from .digits import DIGIT_CLASSES

# Held-out fonts: one or two per family, so every family is seen in train but these faces are not.
VAL_FONTS = ("DejaVuSans-Oblique", "DejaVuSerif-Bold", "STIXGeneralBol", "cmtt10")
TEST_FONTS = ("DejaVuSansMono-BoldOblique", "DejaVuSerif-Italic", "STIXGeneralItalic", "cmss10")
TRAIN_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-BoldOblique", "DejaVuSansMono",
               "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSerif", "DejaVuSerif-BoldItalic",
               "STIXGeneral", "STIXGeneralBolIta", "cmb10", "cmr10", "cmti10", "cmmi10")
PER_FONT_CLASS = 45  # 22 fonts x 10 digits x 45 = 9,900 images
SIZE, SCALE = 28, 2  # output size, supersampling factor


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB (0-255) whose luminances differ by at least 80."""
    w = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(w @ fg - w @ bg) >= 80:
            return fg.astype(np.float32), bg.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _zero_height(path: str) -> int:
    """Height of the glyph '0' at size 100: fonts differ, so sizes are set by glyph height."""
    from PIL import ImageFont

    _, top, _, bottom = ImageFont.truetype(path, 100).getbbox("0")
    return bottom - top


@functools.lru_cache(maxsize=4096)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def render_digit(font_path: Path, digit: int, rng: np.random.Generator):
    """One digit as uint8 H x W x 3 (numpy), every nuisance drawn from ``rng``."""
    from PIL import Image, ImageDraw, ImageFilter

    n = SIZE * SCALE
    height = rng.uniform(0.5, 0.8) * n                 # glyph height in pixels
    font = _font(str(font_path), max(8, int(round(100 * height / _zero_height(str(font_path))))))
    stroke = int(rng.integers(0, 3))                   # extra stroke width (bolder strokes)

    mask = Image.new("L", (2 * n, 2 * n), 0)          # room to rotate without clipping
    draw = ImageDraw.Draw(mask)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    cx, cy = n + rng.normal(0, 0.06 * n), n + rng.normal(0, 0.05 * n)
    x0, y0 = cx - (left + right) / 2, cy - (top + bottom) / 2
    draw.text((x0, y0), str(digit), font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    if rng.random() < 0.35:                            # cropped neighbours, as in house numbers
        gap = (right - left) + rng.uniform(0.05, 0.25) * n
        for side in (-1, 1):
            if rng.random() < 0.7:
                draw.text((x0 + side * gap, y0), str(int(rng.integers(10))), font=font, fill=255,
                          stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, center=(n, n))
    mask = mask.crop((n // 2, n // 2, n // 2 + n, n // 2 + n))
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))

    fg, bg = _contrasting_colours(rng)
    yy, xx = np.mgrid[0:n, 0:n] / n
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]  # linear gradient background
    back = bg + rng.uniform(-40, 40, 3) * ramp + rng.normal(0, rng.uniform(0, 12), (n, n, 3))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    img = np.clip(alpha * fg + (1 - alpha) * back, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.LANCZOS))


def render_syndigits(fonts: tuple[str, ...], per_font_class: int, seed: int):
    """uint8 N x 3 x 28 x 28 images, int64 labels and the font index of each image."""
    rng = np.random.default_rng(seed)
    imgs, labels, font_ids = [], [], []
    for fi, name in enumerate(fonts):
        path = font_dir() / f"{name}.ttf"
        for digit in range(10):
            for _ in range(per_font_class):
                imgs.append(render_digit(path, digit, rng))
                labels.append(digit)
                font_ids.append(fi)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), torch.tensor(font_ids, dtype=torch.int64)


@register_domain(family="digits", display="SynDigits")
@cached("v1")
def syndigits() -> DomainData:
    """Synthetic digits rendered from 22 matplotlib fonts (SynNumbers-style); val/test in unseen fonts."""
    fonts = TRAIN_FONTS + VAL_FONTS + TEST_FONTS
    x, y, font_id = render_syndigits(fonts, PER_FONT_CLASS, seed=0)
    n_train, n_val = len(TRAIN_FONTS), len(VAL_FONTS)
    split = (font_id >= n_train).long() + (font_id >= n_train + n_val).long()
    return DomainData(x, y, DIGIT_CLASSES, split=split,
                      info={"fonts": list(fonts), "font_id": font_id.tolist(),
                            "source": "matplotlib mpl-data/fonts/ttf rendered with PIL"})
