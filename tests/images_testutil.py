"""Helpers for the encode-images tests: tiny random autoencoders and generated images/manifests."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLI = str(Path(__file__).resolve().parents[1] / "cli.py")


def tiny_vae(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random 2-block AutoencoderKL (downsampling 2, 4 latent channels) saved to ``folder``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1,
    )
    config.update(overrides)
    AutoencoderKL(**config).save_pretrained(folder)
    return folder


def random_rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content (a gradient plus noise) so JPEG artifacts stay small and resizing matters.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), np.full_like(x, 128.0)], -1)
    noise = rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, n: int, sizes=((48, 40), (40, 48), (64, 64), (36, 60)), fmt: str = "jpg",
                 captions: int = 2) -> list[dict]:
    """``n`` images of cycling sizes, and their manifest records (several captions each)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        name = f"img{i:04d}.{fmt}"
        random_rgb(w, h, seed=i).save(folder / name)
        records.append({"id": f"s{i}", "image": name, "text": [f"caption {i} v{j}" for j in range(captions)]})
    return records


def write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` but whose data is a few bytes: a decompression bomb's
    signature without the memory cost."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path
