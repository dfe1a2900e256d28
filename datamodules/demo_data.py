"""Built-in demo data: real photographs shipped with scikit-image, and synthetic "generated" images.

Real images are tiles cut from scikit-image's bundled photographs. Fakes come from a documented
synthetic process that leaves generator-like traces, one per demo "generator":

- `demo_upsample`: the tile is downsampled ×8 and upsampled with nearest neighbour (8-pixel blocks).
- `demo_smooth`: the tile is downsampled ×8 and upsampled bilinearly: fine detail is replaced by
  smooth interpolation, as in low-resolution-then-upsampled generation.

Both then get the same ±48 checkerboard of 8-pixel cells, the periodic trace an ×8 upsampling
decoder leaves: the shared trace is what lets a detector trained on one generator find the other
(GenImage's protocol), and its 8-pixel scale is what a latent (/8) and CLIP's layer3 (/16) keep.

Both classes are saved as PNG so file format is no shortcut. The tree is GenImage's layout
(`<root>/<generator>/{train,val}/{ai,nature}`), so the demo runs the same converter and protocol
(train on one generator, test on all) as a real GenImage run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "brick", "grass", "gravel")
GENERATORS = ("demo_upsample", "demo_smooth")
TOY_GENIMAGE_FOLDERS = ("imagenet_ai_0419_sdv4", "imagenet_glide")  # `toy-data`: the README's GenImage names
TRACE_SCALE = 8  # the VAE's downsampling factor: the scale at which a latent diffusion decoder leaves its traces
GRID_AMPLITUDE = 48  # grey levels of the shared grid trace; both generators carry it, so one transfers to the other


def _photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        photos.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    return photos


def _random_tile(photos: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    top = rng.integers(photo.shape[0] - size + 1)
    left = rng.integers(photo.shape[1] - size + 1)
    return photo[top:top + size, left:left + size]


def _grid_trace(size: int, amplitude: int) -> np.ndarray:
    """A checkerboard of TRACE_SCALE-pixel cells: the periodic trace of an ×8 upsampling decoder."""
    return ((np.indices((size, size)).sum(0) // TRACE_SCALE) % 2 * 2 * amplitude - amplitude)[..., None]


def synthesize_fake(tile: np.ndarray, generator: str) -> np.ndarray:
    """Apply one demo generator's synthetic process to a real uint8 RGB tile."""
    size = tile.shape[0]
    small = Image.fromarray(tile).resize((size // TRACE_SCALE, size // TRACE_SCALE), Image.Resampling.BILINEAR)
    if generator == "demo_upsample":
        up = small.resize((size, size), Image.Resampling.NEAREST)
    elif generator == "demo_smooth":
        up = small.resize((size, size), Image.Resampling.BILINEAR)
    else:
        raise ValueError(f"unknown demo generator {generator!r}; choose from {GENERATORS}")
    return np.clip(np.asarray(up).astype(np.int16) + _grid_trace(size, GRID_AMPLITUDE), 0, 255).astype(np.uint8)


def build_demo_images(root: str | Path, per_class: dict[str, int] | None = None, tile_size: int = 128,
                      seed: int = 0, permute_labels: bool = False, folders: tuple[str, ...] = GENERATORS) -> Path:
    """Write the demo tree; `per_class` maps split → images per class and generator, `folders` names the
    generators' folders (GENERATORS' processes, in order).

    `permute_labels` is the control run: the same images, but for a random half of the (real, fake)
    pairs the real goes to ai/ and the fake to nature/, so labels no longer depend on the images and
    a pipeline that keeps features and labels aligned must score at chance.
    """
    per_class = per_class or {"train": 40, "val": 20}
    root = Path(root)
    photos = _photos()
    for split_index, (split, count) in enumerate(sorted(per_class.items())):
        for gen_index, (generator, folder) in enumerate(zip(GENERATORS, folders, strict=True)):
            rng = np.random.default_rng([seed, split_index, gen_index])
            swaps = np.random.default_rng([seed, split_index, gen_index, 1]).permutation(count) < count // 2
            for label_dir in ("ai", "nature"):
                (root / folder / split / label_dir).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                real = _random_tile(photos, tile_size, rng)
                fake = synthesize_fake(_random_tile(photos, tile_size, rng), generator)
                if permute_labels and swaps[i]:
                    real, fake = fake, real
                Image.fromarray(real).save(root / folder / split / "nature" / f"real_{i:04d}.png")
                Image.fromarray(fake).save(root / folder / split / "ai" / f"fake_{i:04d}.png")
    return root


def build_toy_data(out: str | Path, images_per_class: int, tile_size: int, seed: int = 0) -> tuple[Path, Path]:
    """A GenImage-shaped tree (OUT/GenImage, the demo's two processes as GenImage's `imagenet_ai_0419_sdv4` and
    `imagenet_glide`; val gets half the images), a calibration folder of real tiles (OUT/calibration) and a
    prompt file for `generate` (OUT/prompts.txt): the inputs the README's workflow lines expect, so they run as
    written without the dataset."""
    out = Path(out)
    tree = build_demo_images(out / "GenImage", {"train": images_per_class, "val": max(2, images_per_class // 2)},
                             tile_size, seed, folders=TOY_GENIMAGE_FOLDERS)
    calibration = out / "calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    photos, rng = _photos(), np.random.default_rng([seed, 2])
    for i in range(images_per_class):
        Image.fromarray(_random_tile(photos, tile_size, rng)).save(calibration / f"real_{i:04d}.png")
    (out / "prompts.txt").write_text("a photo of a goldfish\n")
    return tree, calibration
