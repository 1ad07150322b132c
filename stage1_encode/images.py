"""``encode-images``: run the frozen autoencoder once over every image and write the latent cache.

The run, in order:
  1. Read the manifest (one record per image, however many captions it has). Every process reads
     the image *headers* of its slice of the records in a thread pool (Pillow opens lazily: size, mode,
     EXIF orientation), rank 0 gathers them. Missing, zero-byte, non-image, too small and oversized
     images are known here and left out; every other image gets a row in its bucket. That fixes the
     bucket sizes, the shard plan and the exact store size before any model runs (``--estimate``
     stops here).
  2. Rank 0 creates the store (or reopens it with ``--resume``, refusing another autoencoder, other
     image settings or another manifest).
  3. Each process takes a contiguous range of (bucket, shard) units. DataLoader workers decode and
     resize the images; the main process runs the autoencoder on fixed batches (``--batch-size``
     rows from the start of the shard) and fills a shard buffer; a writer thread writes full shards.
  4. Rank 0 checks every done flag, folds decode-time failures into ``index.parquet`` and
     ``skipped.jsonl``, and marks the store complete.

Why rows are planned from headers: a shard must be written whole by one process, and a resumed or
multi-process run must write the same store as one uninterrupted run, so each image's row has to be
known before anything is decoded. Decoding every image twice (once to plan) would double the cost
that the workers exist to hide; headers are nearly free. The few images whose data is truncated or
corrupt beyond a valid header fail only at decode time: they keep their planned row, marked in the
``status`` array with the reason (the row's bytes stay zero and no reader returns them), and are
reported like every other bad image. Since decoding is deterministic and batches are a function of
the shard alone, every split of units over processes and every resume point gives the same bits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semroute.shared import images as im
from semroute.shared.checks import check_number
from semroute.shared.distributed import ProcessInfo
from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.fingerprint import sha256_text
from semroute.shared.integrity import INDEX
from semroute.shared.latent_store import (
    LATENT_KIND,
    OK,
    STATUS_CODE,
    Bucket,
    LatentCacheWriter,
    LatentStorage,
    ShardPayload,
    bucket_nbytes,
    read_skipped,
)
from semroute.shared.manifest import Problem
from semroute.shared.sources import ImageRange, read_image_bytes, read_source, split_locator
from semroute.shared.store import read_parquet
from semroute.shared.vae import LatentEncoder, VAEInfo, describe_vae, load_encoder, store_dtype_name
from semroute.stage1_encode.encode_run import (EncodeRun, ShardSizes, ShardWriterThread, decide, rate,
                                                refuse_known_ids, retries_note)


@dataclass
class EncodeImagesConfig(ShardSizes):
    data: str
    out: str
    vae: str = "pixel"
    vae_subfolder: str | None = None
    patch_size: int = 2  # pixel codec only
    resolution: int = 256
    buckets: str = "none"  # none | auto[:MAX_ASPECT] | WxH,WxH,...
    image_root: str | None = None
    allow_outside_root: bool = False  # let --image-root's manifests name files outside it
    image_key: str = "image"
    id_key: str = "id"
    input_format: str = "auto"  # manifest | folder | parquet | csv | webdataset (shared/sources.py)
    storage_options: dict | None = None  # fsspec options for URLs (endpoint, credentials)
    background: str = "white"
    allow_upscale: bool = False
    max_pixels: int = im.DEFAULT_MAX_PIXELS
    resample: str = "bicubic"
    dtype: str = "float32"  # the SD VAE overflows in float16; bfloat16 is fine for FLUX/SD3 VAEs on a GPU
    device: str = "auto"
    batch_size: int = 16
    workers: int = -1  # decoding processes; -1: one per spare CPU core (at most 8)
    probe_threads: int = 16  # header reads are I/O bound: threads suffice
    shard_mb: float = 64.0
    chunk_kb: float = 64.0
    skip_bad: bool = False  # bad manifest records (bad images are always skipped and reported)
    resume: bool = False
    append: bool = False  # add the images of `data` to the existing cache `out` (new shards only)
    overwrite: bool = False
    estimate: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
def image_options(cfg: EncodeImagesConfig, info: VAEInfo) -> im.ImageOptions:
    # Bucket sides are multiples of 2x the downsampling so every latent side is even (DiT patch 2).
    buckets = im.parse_buckets(cfg.buckets, cfg.resolution, 2 * info.downsample)
    if not buckets:
        info.latent_shape(cfg.resolution, cfg.resolution)  # raises if not divisible
    for w, h in buckets or ():
        info.latent_shape(h, w)
    return im.ImageOptions(resolution=cfg.resolution, buckets=buckets, background=im.parse_background(cfg.background),
                           allow_upscale=cfg.allow_upscale, max_pixels=cfg.max_pixels, resample=cfg.resample)


def resolve_image(image: str, root: str | None) -> str:
    if "://" in image or split_locator(image)[1] is not None:
        return image  # a URL, or an image inside a tar/Parquet container (already a full locator)
    path = Path(image).expanduser()
    return str(Path(root).expanduser() / path) if root and not path.is_absolute() else str(path)


def confine_to_root(manifest, paths: list[str], ranges: list, cfg: "EncodeImagesConfig") -> tuple[list[str], list]:
    """With ``--image-root``, every image must lie inside it once ``..`` and symlinks are resolved: a
    manifest from elsewhere cannot make the encoder read (and store, as pixels or latents) files outside
    the folder it was pointed at. An escaping record is a bad record (an error naming file and line, or
    left out and listed with ``--skip-bad``); ``--allow-outside-root`` lifts the rule. Without
    ``--image-root`` paths are used as given (relative ones from the working directory). URLs and images
    inside containers (tar, Parquet) are not files under the root and pass as they are."""
    if not cfg.image_root or cfg.allow_outside_root:
        return paths, ranges
    root = Path(cfg.image_root).expanduser().resolve()
    kept_records, kept_paths, kept_ranges = [], [], []
    for record, path, image_range in zip(manifest.records, paths, ranges):
        local = "://" not in path and split_locator(path)[1] is None
        real = Path(path).resolve() if local else None
        if real is None or real == root or root in real.parents:
            kept_records.append(record)
            kept_paths.append(path)
            kept_ranges.append(image_range)
            continue
        reason = (f"image {record.image!r} resolves to {real}, outside --image-root {root} "
                  "(pass --allow-outside-root to allow it)")
        if not cfg.skip_bad:
            raise ManifestError(f"{manifest.path}:{record.line}: {reason}")
        manifest.problems.append(Problem(manifest.path, record.line, reason))
    manifest.records[:] = kept_records
    return kept_paths, kept_ranges


def image_bytes(path: str, image_range: ImageRange | None, storage_options: dict | None = None) -> bytes | None:
    """The bytes of an image inside a container (None for a file): an unreadable container is a bad image."""
    try:
        return read_image_bytes(path, image_range, storage_options)
    except (OSError, ValueError) as err:
        raise im.BadImage(path, im.UNREADABLE, str(err)) from None


def _probe(path: str, image_range: ImageRange | None, opts: im.ImageOptions, storage_options: dict | None) -> im.Probe:
    try:
        data = image_bytes(path, image_range, storage_options)
    except im.BadImage as bad:
        return im.Probe(path=path, reason=bad.reason, detail=bad.detail)
    return im.probe_image(path, opts, data)


def probe_all(paths: list[str], opts: im.ImageOptions, threads: int, progress: bool, desc: str = "reading headers",
              ranges: list[ImageRange | None] | None = None, storage_options: dict | None = None) -> list[im.Probe]:
    from tqdm.auto import tqdm

    ranges = ranges or [None] * len(paths)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        out = []
        for probe in pool.map(lambda k: _probe(paths[k], ranges[k], opts, storage_options), range(len(paths)),
                              chunksize=64):
            out.append(probe)
            bar.update(1)
    return out


@dataclass
class ImagePlan:
    index: object  # pyarrow Table, one row per manifest record
    bucket_rows: list[int]  # images per target of ImageOptions.targets
    skipped: list[dict] = field(default_factory=list)  # bad manifest records and header failures


def build_plan(records, paths: list[str], probes: list[im.Probe], opts: im.ImageOptions, manifest_problems,
               ranges: list[ImageRange | None] | None = None) -> ImagePlan:
    """Assign each usable image a (bucket, row), rows in manifest order; list the rest with reasons."""
    import pyarrow as pa

    n_targets = len(opts.targets)
    rows_used = [0] * n_targets
    bucket, row, boxes, status, reason = [], [], [], [], []
    skipped = [{"path": p.path, "line": p.line, "reason": p.reason} for p in manifest_problems]
    for rec, probe in zip(records, probes):
        if probe.ok:
            t = probe.target
            w, h = opts.targets[t]
            bucket.append(f"{w}x{h}")
            row.append(rows_used[t])
            rows_used[t] += 1
            boxes.append(im.center_box(*probe.oriented, (w, h)))
            status.append("pending")
            reason.append(None)
        else:
            bucket.append(None)
            row.append(-1)
            boxes.append((np.nan,) * 4)
            status.append(probe.reason)
            reason.append(probe.detail)
            skipped.append({"sample_id": rec.sample_id, "line": rec.line, "path": probe.path,
                            "status": probe.reason, "reason": probe.detail})
    box = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    index = pa.table({
        "sample_id": pa.array([r.sample_id for r in records], pa.string()),
        "line": pa.array([r.line for r in records], pa.int64()),
        "image": pa.array([r.image for r in records], pa.string()),
        "path": pa.array(paths, pa.string()),
        # Byte range of an image inside a tar shard (null for files and Parquet cells).
        "offset": pa.array([r.offset if r else None for r in ranges or [None] * len(paths)], pa.int64()),
        "size": pa.array([r.size if r else None for r in ranges or [None] * len(paths)], pa.int64()),
        "file_bytes": pa.array([p.file_bytes for p in probes], pa.int64()),
        "orig_width": pa.array([p.width for p in probes], pa.int32()),
        "orig_height": pa.array([p.height for p in probes], pa.int32()),
        "orientation": pa.array([p.orientation for p in probes], pa.int8()),
        "mode": pa.array([p.mode for p in probes], pa.string()),
        "bucket": pa.array(bucket, pa.string()),
        "row": pa.array(row, pa.int64()),
        # The crop box in the EXIF-oriented source image, pixels: resized to the bucket's size.
        # (null for images left out).
        **{f"crop_{c}": pa.array(box[:, j], mask=np.isnan(box[:, j])) for j, c in enumerate(("x0", "y0", "x1", "y1"))},
        "status": pa.array(status, pa.string()),
        "reason": pa.array(reason, pa.string()),
    })
    return ImagePlan(index, rows_used, skipped)


def plan_buckets(plan: ImagePlan, opts: im.ImageOptions, info: VAEInfo, itemsize: int, cfg: EncodeImagesConfig
                 ) -> list[Bucket]:
    """One Bucket per target that received images, with its shard layout."""
    out = []
    for (w, h), rows in zip(opts.targets, plan.bucket_rows):
        if rows:
            shape = info.latent_shape(h, w)
            out.append(Bucket.plan(w, h, shape, rows, int(np.prod(shape)) * itemsize,
                                   cfg.shard_bytes, cfg.chunk_bytes))
    return out


def input_sha256(records, paths: list[str]) -> str:
    """What the manifest asks for: sample ids and image paths (a resume must see the same list)."""
    return sha256_text("\n".join(f"{r.sample_id}\t{p}" for r, p in zip(records, paths)))


def fingerprint(info: VAEInfo, opts: im.ImageOptions, cfg: EncodeImagesConfig) -> dict:
    return {
        **info.identity,
        "posterior": info.posterior,
        "latent_channels": info.latent_channels,
        "downsample": info.downsample,
        "scaling_factor": info.scaling_factor,
        "shift_factor": info.shift_factor,
        "stored_dtype": store_dtype_name(info, cfg.dtype),
        **opts.fingerprint(),
    }


def estimate_images(plan: ImagePlan, buckets: list[Bucket], info: VAEInfo, cfg: EncodeImagesConfig) -> dict:
    storage = LatentStorage(store_dtype_name(info, cfg.dtype))
    arrays = ["mean", "logvar"] if info.posterior == "gaussian" else ["latent"]
    total = sum(bucket_nbytes(b, arrays, storage.numpy_dtype.itemsize) for b in buckets)
    planned = sum(b.rows for b in buckets)
    raw = sum(b.rows * int(np.prod(b.latent_shape)) * storage.numpy_dtype.itemsize for b in buckets)
    return {
        "records": plan.index.num_rows,
        "images": planned,
        "skipped_before_decoding": dict(Counter(s.get("status", "bad manifest record") for s in plan.skipped)),
        "stores": f"{', '.join(arrays)} in {storage.stored_dtype}",
        "buckets": {b.name: {"images": b.rows, "latent_shape": list(b.latent_shape), "shards": b.layout.n_shards,
                             "images_per_shard": b.layout.rows_per_shard} for b in buckets},
        "bytes_total_arrays": total,
        "bytes_per_image": total / max(1, planned),
        "raw_latent_bytes_per_image": raw / max(1, planned),
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def check_image_options(cfg: EncodeImagesConfig) -> None:
    check_number("--resolution", cfg.resolution, integer=True, low=1)
    check_number("--patch-size", cfg.patch_size, integer=True, low=1)
    check_number("--max-pixels", cfg.max_pixels, integer=True, low=1)
    check_number("--batch-size", cfg.batch_size, integer=True, low=1)
    check_number("--workers", cfg.workers, integer=True, low=-1)
    check_number("--shard-mb", cfg.shard_mb, low=0.0, low_open=True)
    if cfg.image_root is not None and not str(cfg.image_root).strip():
        raise SemrouteError("--image-root is empty; give the folder the manifest's image paths are relative to "
                            "(--image-root . for the current folder), or leave it out")
    if cfg.image_root and "://" not in cfg.image_root and not Path(cfg.image_root).expanduser().is_dir():
        # Said once here: otherwise every record would be refused as lying outside a folder that is not there.
        what = "is not a folder" if Path(cfg.image_root).expanduser().exists() else "does not exist"
        raise SemrouteError(f"--image-root {cfg.image_root} {what}; give the folder the manifest's image paths are "
                            "relative to")


def encode_images(cfg: EncodeImagesConfig, *, proc: ProcessInfo | None = None) -> dict:
    """Run ``encode-images``; returns a summary dict (also printed by the CLI)."""
    return EncodeImagesRun(cfg, proc).run()


class EncodeImagesRun(EncodeRun):
    """``encode-images`` filled into the encode-run skeleton (``encode_run.EncodeRun``)."""

    open_writer = staticmethod(LatentCacheWriter.open)

    def __init__(self, cfg: EncodeImagesConfig, proc: ProcessInfo | None = None):
        super().__init__(cfg, proc)
        check_image_options(cfg)
        self.info = describe_vae(cfg.vae, cfg.vae_subfolder, cfg.patch_size)
        self.encoder = None
        if self.info.downsample == 0 or self.info.latent_channels == 0:
            # The config does not state the latent geometry: load the model now and measure it.
            self.encoder = self._load_encoder()
        self.opts = image_options(cfg, self.info)

    def _load_encoder(self) -> LatentEncoder:
        cfg = self.cfg
        return load_encoder(cfg.vae, cfg.vae_subfolder, device=self.proc.device_for(cfg.device), dtype=cfg.dtype,
                            patch_size=cfg.patch_size, info=self.info)

    def plan_and_create(self) -> dict:
        """Create, resume or grow (rank 0 decides); to create or grow, every rank reads its slice of the image
        headers and rank 0 plans the buckets and creates (or grows) the store."""
        cfg, proc, info, opts = self.cfg, self.proc, self.info, self.opts
        manifest = read_source(cfg.data, kind=cfg.input_format, image_key=cfg.image_key, id_key=cfg.id_key,
                               need_text=False, need_image=True, skip_bad=cfg.skip_bad,
                               storage_options=cfg.storage_options)
        records = manifest.records
        paths = [resolve_image(r.image, cfg.image_root) for r in records]
        ranges = [manifest.image_range(k) for k in range(len(records))]
        paths, ranges = confine_to_root(manifest, paths, ranges, cfg)
        want = fingerprint(info, opts, cfg)
        sha = input_sha256(records, paths)
        action = "create" if cfg.estimate else proc.run_on_main(lambda: _decide(cfg, want, sha))
        if action not in ("create", "append"):
            return {}
        n, r, w = len(paths), proc.rank, proc.world_size
        mine = probe_all(paths[n * r // w: n * (r + 1) // w], opts, cfg.probe_threads, self.show,
                         ranges=ranges[n * r // w: n * (r + 1) // w], storage_options=cfg.storage_options)
        probes = [p for part in proc.gather_object(mine) for p in part]
        return proc.run_on_main(lambda: _plan_and_create(cfg, info, opts, want, sha, records, paths, probes,
                                                         manifest.problems, ranges, grow=action == "append",
                                                         id_source=manifest.id_source())) or {}

    def my_units(self, writer: LatentCacheWriter) -> list:
        return writer.split(self.proc.rank, self.proc.world_size)

    def prepare(self, writer: LatentCacheWriter) -> None:
        if self.encoder is None:
            self.encoder = self._load_encoder()

    def encode(self, writer: LatentCacheWriter, units: list, background: ShardWriterThread) -> dict:
        return _encode_units(writer, self.encoder, self.opts, units, self.cfg, background, show=self.show,
                             rank=self.proc.rank, world=self.proc.world_size)

    def summary(self, writer: LatentCacheWriter, finished: dict, stats: list[dict], elapsed: float,
                planned: dict) -> dict:
        encoded = sum(s["encoded"] for s in stats)
        return {
            **self.base_summary(len(writer.units()), sum(s["units"] for s in stats), elapsed),
            "records": writer.attrs["n_records"],
            **finished,
            "encoded_this_run": encoded,
            "decode_failures_this_run": sum(s["failed"] for s in stats),
            "images_per_s": rate(encoded, elapsed),
            "skipped": read_skipped(self.cfg.out),
        }


def _decide(cfg: EncodeImagesConfig, want: dict, sha: str) -> str:
    return decide(cfg, LatentCacheWriter.open, want, sha, kind=LATENT_KIND, inputs="images",
                  changed="the manifest or --image-root changed")


def _plan_and_create(cfg, info, opts, want, sha, records, paths, probes, problems, ranges=None, grow=False,
                     id_source=None):
    plan = build_plan(records, paths, probes, opts, problems, ranges)
    storage = LatentStorage(want["stored_dtype"])
    buckets = plan_buckets(plan, opts, info, storage.numpy_dtype.itemsize, cfg)
    if grow:
        writer = LatentCacheWriter.open(cfg.out)
        if writer.attrs.get("appending") is None:  # not a rerun of a grow that stopped halfway
            have = read_parquet(cfg.out, INDEX, columns=["sample_id"]).column("sample_id").to_pylist()
            segments = writer.attrs.get("segments") or [{"source": writer.attrs.get("source"), "first_record": 0}]
            refuse_known_ids(cfg, have, ((r.sample_id, r.line) for r in records), segments, "first_record", "record")
        writer.append(buckets=buckets, index=plan.index, input_sha256=sha, source=str(cfg.data), skipped=plan.skipped)
        return None
    if cfg.estimate:
        return {"estimate": estimate_images(plan, buckets, info, cfg), "skipped": plan.skipped}
    if not buckets:
        raise SemrouteError(f"no usable image in {cfg.data} ({len(plan.skipped)} skipped; first: "
                            f"{plan.skipped[0] if plan.skipped else '-'})")
    LatentCacheWriter.create(
        cfg.out, buckets=buckets, arrays=["mean", "logvar"] if info.posterior == "gaussian" else ["latent"],
        stored_dtype=storage.stored_dtype, index=plan.index, fingerprint=want, input_sha256=sha,
        skipped=plan.skipped, extra={"source": str(cfg.data), "sample_ids": id_source or {}},
        vae={"scaling_factor": info.scaling_factor, "shift_factor": info.shift_factor,
             "latent_channels": info.latent_channels, "downsample": info.downsample},
    )
    return None


# ---------------------------------------------------------------------------------------------
# Decoding in workers, encoding in the main process
# ---------------------------------------------------------------------------------------------
class DecodeImages(torch.utils.data.Dataset):
    """Item ``k``: ``(k, uint8 [3, H, W] or None, reason, detail)`` for ``paths[k]`` at ``targets[k]``
    (``ranges[k]``: the byte range of an image inside a tar shard)."""

    def __init__(self, paths: list[str], targets: list[tuple[int, int]], opts: im.ImageOptions,
                 ranges: list[ImageRange | None] | None = None, storage_options: dict | None = None):
        self.paths, self.targets, self.opts = paths, targets, opts
        self.ranges = ranges or [None] * len(paths)
        self.storage_options = storage_options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int):
        try:
            data = image_bytes(self.paths[k], self.ranges[k], self.storage_options)
            pixels, _ = im.load_image(self.paths[k], self.opts, self.targets[k], data)
            return k, torch.from_numpy(pixels), None, None
        except im.BadImage as bad:
            return k, None, bad.reason, bad.detail


def collate_decoded(items):
    """-> (task numbers of decoded images, their pixels ``uint8 [n, 3, H, W]`` or None, failures)."""
    ok = [(k, px) for k, px, _, _ in items if px is not None]
    failed = [(k, reason, detail) for k, px, reason, detail in items if px is None]
    pixels = torch.stack([px for _, px in ok]) if ok else None
    return [k for k, _ in ok], pixels, failed


def start_batches(loader: torch.utils.data.DataLoader):
    """``iter(loader)``, with Ctrl-C and SIGTERM held until its decoding processes are started and it is whole.

    A terminal's Ctrl-C reaches every process of its group: a worker caught starting up printed a traceback (from
    logging's, zarr's or multiprocessing's fork handlers), and the signal reaching this process inside the
    iterator's constructor left it half-built, its ``__del__`` printing another (no ``_workers`` yet). Both
    signals are blocked here while the workers are started (a forked or spawned child keeps its parent's signal
    mask: they never see either), and this process only records them meanwhile (blocking them in this thread is
    not enough: another thread, the shard writer's say, takes the signal and Python still runs the handler here).
    Then they are raised again and stop this process alone (shared/interrupts.py), which shuts its workers down
    (the iterator's ``_shutdown_workers``; a worker whose parent is gone ends by itself). A worker killed by a
    SIGTERM sent to the whole group would instead fail this process with torch's "DataLoader worker ... is killed
    by signal" traceback."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    held, came = (signal.SIGINT, signal.SIGTERM), []
    previous = {sig: signal.signal(sig, lambda signum, _: came.append(signum)) for sig in held}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(came):
            signal.raise_signal(sig)  # to the handlers in force again (Ctrl-C's KeyboardInterrupt, ...)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is single-threaded Pillow; leave the cores to the others
    sys.excepthook = _quiet_when_consumer_left


def _quiet_when_consumer_left(exc_type, exc, tb) -> None:
    """A worker hands each batch's memory to the main process through multiprocessing's resource sharer, a server
    thread in the worker that reports its failures through ``sys.excepthook`` and serves on. A Ctrl-C that stops
    the main process in the middle of that handshake breaks the connection, and the worker printed the traceback:
    the main process reports the stop. Anything else is printed as before."""
    sharer = os.path.join("multiprocessing", "resource_sharer.py")
    if issubclass(exc_type, (ConnectionError, EOFError)) and any(
            frame.f_code.co_filename.endswith(sharer) for frame, _ in traceback.walk_tb(tb)):
        return
    sys.__excepthook__(exc_type, exc, tb)


def default_workers(world_size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, world_size) - 1))


def _encode_units(writer: LatentCacheWriter, encoder: LatentEncoder, opts: im.ImageOptions,
                  units: list[tuple[int, int]], cfg: EncodeImagesConfig, background: ShardWriterThread, *,
                  show: bool, rank: int, world: int) -> dict:
    from tqdm.auto import tqdm

    index = read_parquet(cfg.out, INDEX)
    bucket_col = np.asarray(index.column("bucket").to_pylist(), dtype=object)
    path_col = index.column("path").to_pylist()
    has_ranges = "offset" in index.column_names  # caches made before tar inputs existed lack them
    offset_col = index.column("offset").to_pylist() if has_ranges else None
    size_col = index.column("size").to_pylist() if has_ranges else None
    # Tasks: one per row of this process's units, in unit order; batches never cross a unit.
    task_path, task_range, task_target, task_unit, task_row, batches = [], [], [], [], [], []
    by_bucket: dict[str, np.ndarray] = {}
    for u, (k, s) in enumerate(units):
        bucket = writer.buckets[k]
        if bucket.name not in by_bucket:
            by_bucket[bucket.name] = np.flatnonzero(bucket_col == bucket.name)  # ordered by row
        a, b = bucket.layout.shard_rows(s)
        first = len(task_path)
        for r in range(a, b):
            i = int(by_bucket[bucket.name][r])
            task_path.append(path_col[i])
            task_range.append(ImageRange(offset_col[i], size_col[i]) if has_ranges and offset_col[i] is not None
                              else None)
            task_target.append((bucket.width, bucket.height))
            task_unit.append(u)
            task_row.append(r - a)
        batches += [list(range(i, min(i + cfg.batch_size, first + b - a))) for i in range(first, first + b - a,
                                                                                           cfg.batch_size)]
    if not task_path:
        return {"encoded": 0, "failed": 0, "units": 0, "rank": rank}
    workers = default_workers(world) if cfg.workers < 0 else cfg.workers
    loader = torch.utils.data.DataLoader(
        DecodeImages(task_path, task_target, opts, task_range, cfg.storage_options), batch_sampler=batches, collate_fn=collate_decoded,
        num_workers=workers, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None, pin_memory=encoder.device.type == "cuda",
    )
    storage = writer.storage
    bar = tqdm(total=len(task_path), unit="img", desc=f"encode-images[{rank}]", disable=not show, smoothing=0.05)
    buffers: dict[int, tuple[ShardPayload, list[int]]] = {}
    encoded = failed = 0
    t_start = time.perf_counter()
    try:
        for ks, pixels, failures in start_batches(loader):
            u = task_unit[(ks or [f[0] for f in failures])[0]]
            if u not in buffers:
                bucket = writer.buckets[units[u][0]]
                a, b = writer.unit_rows(units[u])
                arrays = {n: np.zeros((b - a, *bucket.latent_shape), storage.numpy_dtype) for n in writer.arrays}
                buffers[u] = (ShardPayload(arrays, np.zeros(b - a, np.uint8)), [b - a])
            payload, remaining = buffers[u]
            if pixels is not None:
                out = encoder.encode(pixels)
                rows = [task_row[k] for k in ks]
                for name in writer.arrays:
                    data = storage.to_numpy(out[name])
                    if data.shape[1:] != payload.arrays[name].shape[1:]:
                        raise SemrouteError(f"the autoencoder gave latents of shape {tuple(data.shape[1:])}, the plan "
                                            f"expects {payload.arrays[name].shape[1:]}")
                    payload.arrays[name][rows] = data
                payload.status[rows] = OK
                encoded += len(ks)
            for k, reason, detail in failures:
                payload.status[task_row[k]] = STATUS_CODE[reason]
                failed += 1
                bar.write(f"skipped {task_path[k]}: {reason}: {detail}")
            remaining[0] -= len(ks) + len(failures)
            bar.update(len(ks) + len(failures))
            per_s = encoded / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{per_s:.1f} img/s encoded, {failed} skipped{retries_note()}", refresh=False)
            if remaining[0] == 0:
                background.put(units[u], payload)
                del buffers[u]
    finally:
        bar.close()
    background.close()
    return {"encoded": encoded, "failed": failed, "units": len(units), "rank": rank}
