"""Tiny real image trees in the GenImage, DRCT-2M and plain-folder layouts, with the awkward files real data has.

Every builder returns what the converter must make of the tree: the accepted files (relative path →
label, generator, PIL format, JPEG quality) and the paths it must reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Expected:
    """Accepted files by relative path → (label, generator, format, jpeg quality or None), and rejected paths."""

    accepted: dict[str, tuple[int, str, str, int | None]] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)


def noise(seed: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    """Smooth-ish random uint8 pixels (a blurred ramp plus noise compresses like a photo, not like static)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 40, height)[:, None, None]
    pixels = ramp + rng.normal(0, 12, (height, width, channels))
    return np.clip(pixels, 0, 255).astype(np.uint8).squeeze()


def save(path: Path, image: Image.Image, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def truncated(path: Path, seed: int) -> Path:
    """A JPEG cut in half: its header is fine (PIL's verify() passes), its pixels are not."""
    save(path, Image.fromarray(noise(seed, 64, 64)), format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def sixteen_bit(seed: int, size: int = 40) -> Image.Image:
    """A 16-bit grayscale image (PIL mode I;16) using the full 16-bit range."""
    values = (np.random.default_rng(seed).random((size, size)) * 65535).astype(np.uint16)
    return Image.fromarray(values)


def make_genimage(root: Path) -> Expected:
    """Two generators × train/val; PNG fakes and JPEG reals plus gray, CMYK, 16-bit, RGBA, palette and broken files."""
    expected = Expected()

    def add(rel: str, label: int, generator: str, fmt: str, quality: int | None = None) -> None:
        expected.accepted[rel] = (label, generator, fmt, quality)

    for split, offset in (("train", 0), ("val", 100)):
        for g, generator in enumerate(("imagenet_ai_0419_sdv4", "imagenet_glide")):
            base = root / generator / split
            seed = offset + 10 * g
            save(base / "ai" / "fake_rgb.png", Image.fromarray(noise(seed, 48, 48)))
            add(f"{generator}/{split}/ai/fake_rgb.png", 1, generator, "PNG")
            save(base / "nature" / "real_q75.JPEG", Image.fromarray(noise(seed + 1, 56, 40)), quality=75)
            add(f"{generator}/{split}/nature/real_q75.JPEG", 0, generator, "JPEG", 75)
            save(base / "nature" / "real_q96.jpg", Image.fromarray(noise(seed + 2, 40, 64)), quality=96)
            add(f"{generator}/{split}/nature/real_q96.jpg", 0, generator, "JPEG", 96)
        if split == "train":
            sd = root / "imagenet_ai_0419_sdv4" / "train"
            save(sd / "ai" / "fake_rgba.png", Image.fromarray(noise(3, 32, 32, 4)))
            add("imagenet_ai_0419_sdv4/train/ai/fake_rgba.png", 1, "imagenet_ai_0419_sdv4", "PNG")
            save(sd / "ai" / "fake_16bit.png", sixteen_bit(4))
            add("imagenet_ai_0419_sdv4/train/ai/fake_16bit.png", 1, "imagenet_ai_0419_sdv4", "PNG")
            palette = Image.fromarray(noise(5, 32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
            palette.info["transparency"] = 0
            save(sd / "ai" / "fake_palette.png", palette, transparency=0)
            add("imagenet_ai_0419_sdv4/train/ai/fake_palette.png", 1, "imagenet_ai_0419_sdv4", "PNG")
            save(sd / "ai" / "fake.webp", Image.fromarray(noise(6, 32, 32)), format="WEBP", quality=80)
            add("imagenet_ai_0419_sdv4/train/ai/fake.webp", 1, "imagenet_ai_0419_sdv4", "WEBP")
            save(sd / "ai" / "fake_la.png", Image.fromarray(noise(10, 32, 32, 2)))
            add("imagenet_ai_0419_sdv4/train/ai/fake_la.png", 1, "imagenet_ai_0419_sdv4", "PNG")
            save(sd / "nature" / "real_gray_q90.jpeg", Image.fromarray(noise(7, 48, 48, 1)), quality=90)
            add("imagenet_ai_0419_sdv4/train/nature/real_gray_q90.jpeg", 0, "imagenet_ai_0419_sdv4", "JPEG", 90)
            save(sd / "nature" / "real_cmyk_q90.jpg", Image.fromarray(noise(8, 48, 48)).convert("CMYK"), quality=90)
            add("imagenet_ai_0419_sdv4/train/nature/real_cmyk_q90.jpg", 0, "imagenet_ai_0419_sdv4", "JPEG", 90)
            truncated(sd / "nature" / "real_truncated.jpg", 9)
            (sd / "ai" / "fake_empty.png").write_bytes(b"")
            (root / "imagenet_glide" / "train" / "ai" / "notes.txt").write_text("not an image\n")
            expected.rejected |= {"imagenet_ai_0419_sdv4/train/nature/real_truncated.jpg",
                                  "imagenet_ai_0419_sdv4/train/ai/fake_empty.png",
                                  "imagenet_glide/train/ai/notes.txt"}
    return expected


def make_drct(root: Path) -> Expected:
    """MSCOCO reals and two DRCT-2M generators, train2017 and val2017."""
    expected = Expected()
    for split in ("train2017", "val2017"):
        for k in range(2):
            rel = f"MSCOCO/{split}/{k:012d}.jpg"
            save(root / rel, Image.fromarray(noise(k, 48, 40)), quality=90)
            if split == "train2017":
                expected.accepted[rel] = (0, "MSCOCO", "JPEG", 90)
        for generator in ("ldm-text2im-large-256", "stable-diffusion-v1-4"):
            rel = f"DRCT-2M/{generator}/{split}/{0:012d}.png"
            save(root / rel, Image.fromarray(noise(len(generator), 32, 32)))
            if split == "train2017":
                expected.accepted[rel] = (1, generator, "PNG", None)
    return expected


def make_folder(root: Path, labelled: bool) -> Expected:
    """`real/` and `fake/` (plus one stray file) when labelled, else a nested unlabelled folder."""
    expected = Expected()
    if labelled:
        save(root / "real" / "a.jpg", Image.fromarray(noise(1, 32, 32)), quality=80)
        save(root / "fake" / "sub" / "b.png", Image.fromarray(noise(2, 32, 32)))
        save(root / "stray.png", Image.fromarray(noise(3, 32, 32)))
        expected.accepted = {"real/a.jpg": (0, "real", "JPEG", 80), "fake/sub/b.png": (1, "fake", "PNG", None)}
        expected.rejected = {"stray.png"}
    else:
        save(root / "x.png", Image.fromarray(noise(1, 32, 32)))
        save(root / "nested" / "y.jpg", Image.fromarray(noise(2, 32, 32)), quality=70)
        expected.accepted = {"x.png": (-1, root.name, "PNG", None), "nested/y.jpg": (-1, root.name, "JPEG", 70)}
    return expected
