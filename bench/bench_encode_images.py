"""Benchmark for ``encode-images`` (issue 3), measured side by side in one run.

1. Throughput: a full ``encode_images`` run (header pass, store creation, decoding in DataLoader workers,
   VAE, background shard writes) against a bare loop of ``vae.encode`` over the same images already
   decoded and resized into memory, with the same batch size. Goal: run / bare >= 0.9, i.e. decoding
   never makes the VAE wait. Rounds are interleaved (bare, run, bare, run, ...) and the best of each kept,
   since this machine is shared.
2. Storage: bytes on disk per image against the raw size of the latent (one ``[C, h, w]`` array in the
   stored dtype; the cache holds two, mean and log-variance).

Model: a random SD-like ``AutoencoderKL`` (4 blocks, /8, 16 latent channels like SD3/FLUX) with reduced
widths so that a CPU run takes minutes. A narrower VAE is the harder case for this benchmark: decoding
is then a larger share of the work. Images: generated JPEGs of 256..512 px per side, encoded at 256.

    python bench/bench_encode_images.py [--images 192] [--rounds 2] [--write]
    # on a GPU, at the SD VAE's own size:
    python bench/bench_encode_images.py --device cuda --dtype bfloat16 --widths 128,256,512,512 --layers-per-block 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SECTION = "## encode-images (issue 3)"


def make_images(folder: Path, n: int, records: int, seed: int = 0) -> Path:
    """``n`` distinct JPEGs; the manifest lists ``records`` records cycling over them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 513, 2))
        # Low-frequency color field plus noise: JPEG-typical content, not trivially compressible.
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    for i in range(records):
        lines.append(json.dumps({"id": i, "image": f"{i % n:05d}.jpg", "text": f"image {i}"}))
    manifest = folder.parent / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def make_vae(folder: Path, widths: tuple[int, ...], layers: int) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=widths, layers_per_block=layers,
        latent_channels=16, norm_num_groups=32, sample_size=256, scaling_factor=1.5305, shift_factor=0.0609,
    ).save_pretrained(folder)
    return folder


def bare_loop(vae, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds for ``vae.encode`` over pre-decoded ``uint8 [N, 3, H, W]`` pixels (already on the VAE's
    device, so a GPU bare loop pays no host transfer)."""
    from semroute.shared.vae import pixels_to_unit

    sync = torch.cuda.synchronize if pixels.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, pixels.shape[0], batch_size):
            dist = vae.encode(pixels_to_unit(pixels[i:i + batch_size]).to(vae.dtype)).latent_dist
            dist.mean.contiguous(), dist.logvar.contiguous()
    sync()
    return time.perf_counter() - t0


def full_run(manifest: Path, vae_dir: Path, out: Path, args) -> tuple[float, dict]:
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    cfg = EncodeImagesConfig(data=str(manifest), out=str(out), vae=str(vae_dir), resolution=256,
                             image_root=str(manifest.parent / "imgs"), batch_size=args.batch_size,
                             workers=args.workers, overwrite=True, progress=False, device=args.device,
                             dtype=args.dtype)
    t0 = time.perf_counter()
    summary = encode_images(cfg)
    return time.perf_counter() - t0, summary


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}, {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=192, help="distinct generated JPEGs")
    ap.add_argument("--records", type=int, default=0, help="manifest records cycling over them (0: one each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=-1, help="decoding processes of the run (-1: its default)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--widths", default="32,64,128,128", help="block_out_channels (SD's VAE: 128,256,512,512)")
    ap.add_argument("--layers-per-block", type=int, default=1, help="SD's VAE: 2")
    ap.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of bench/RESULTS.md")
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    from semroute.shared import images as im
    from semroute.shared.store import dir_size
    from semroute.stage1_encode.images import default_workers

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-images-"))
    from semroute.shared.dtypes import parse_dtype

    n = args.records or args.images
    manifest = make_images(tmp / "imgs", args.images, n)
    widths = tuple(int(w) for w in args.widths.split(","))
    vae_dir = make_vae(tmp / "vae", widths, args.layers_per_block)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=parse_dtype(args.dtype)).to(args.device)
    vae = vae.eval().requires_grad_(False)

    # Pre-decode once (the bare loop's input), timing the decode itself for context.
    opts = im.ImageOptions(resolution=256)
    t0 = time.perf_counter()
    pixels = torch.stack([torch.from_numpy(im.load_image(str(p), opts)[0])
                          for p in sorted((tmp / "imgs").glob("*.jpg"))])
    decode_ms = (time.perf_counter() - t0) / args.images * 1e3
    pixels = pixels[torch.arange(n) % args.images].to(args.device)  # what the manifest lists, in order
    bare_loop(vae, pixels[: args.batch_size], args.batch_size)  # warm-up

    bare, run_loop, run_wall, summary = [], [], [], {}
    for r in range(args.rounds):
        bare.append(bare_loop(vae, pixels, args.batch_size))
        wall, summary = full_run(manifest, vae_dir, tmp / "bench.latents.zarr", args)
        run_wall.append(wall)
        run_loop.append(summary["seconds"])
        print(f"round {r}: bare {n / bare[-1]:.2f} img/s, run {n / run_loop[-1]:.2f} img/s "
              f"(encode loop), {n / wall:.2f} img/s (whole call)", file=sys.stderr)

    out = tmp / "bench.latents.zarr"
    data_bytes = dir_size(out / "buckets")
    itemsize = torch.empty(0, dtype=parse_dtype(args.dtype)).element_size()
    raw = 16 * 32 * 32 * itemsize  # one [16, 32, 32] array in the stored dtype
    assert summary["n_encoded"] == n
    rows = [
        ("bare `vae.encode` loop on pre-decoded tensors", n / min(bare), "1.00"),
        ("`encode_images`, encode loop (decode in workers + VAE + writes)", n / min(run_loop),
         f"{min(bare) / min(run_loop):.2f}"),
        ("`encode_images`, whole call (+ header pass, store creation, VAE load)", n / min(run_wall),
         f"{min(bare) / min(run_wall):.2f}"),
    ]
    workers = args.workers if args.workers >= 0 else default_workers(1)
    where = f"{args.device.upper()} ({machine()})" if args.device != "cpu" else f"2-core CPU (`lscpu`: {machine()})"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        SECTION, "",
        f"`python bench/bench_encode_images.py {' '.join(sys.argv[1:])}` — {when}, {where}.",
        f"{n} manifest records over {args.images} generated JPEGs of 256–512 px per side -> 256x256 (resize shorter side + center crop); "
        f"random SD-like AutoencoderKL (4 blocks, widths {args.widths}, {args.layers_per_block} layer(s) per block, "
        f"16 latent channels, /8), {args.dtype}, batch {args.batch_size}, {workers} decoding worker(s). "
        f"Best of {args.rounds} interleaved rounds.",
        "",
        "| what | images/s | ratio to bare loop |",
        "|---|---|---|",
        *[f"| {name} | {rate:.2f} | {ratio} |" for name, rate, ratio in rows],
        "",
        "Paired ratios per round (run encode loop / bare loop, same round): "
        + ", ".join(f"{b / r:.2f}" for b, r in zip(bare, run_loop)) + ".",
        "",
        f"Decoding + resizing alone: {decode_ms:.1f} ms per image on one core.",
        "",
        "| storage | bytes per image |",
        "|---|---|",
        f"| raw latent, one [16, 32, 32] {args.dtype} array | {raw} |",
        f"| stored (mean + log-variance, with chunk checksums and shard indexes) | {data_bytes / n:.0f} "
        f"({data_bytes / n / raw:.3f} x raw, {data_bytes / n / (2 * raw):.4f} x the two arrays) |",
        "",
    ])
    shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if args.write:
        write_section(REPO / "bench" / "RESULTS.md", text)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) this benchmark's section, leaving the others as they are."""
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    start = doc.find(SECTION)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text.rstrip("\n") + "\n" + ("" if end < 0 else doc[end:])
    path.write_text(doc)


if __name__ == "__main__":
    main()
