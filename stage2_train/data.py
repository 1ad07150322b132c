"""Training data from the two caches: join by sample id, batch same-shape latents, pad text.

Every random choice made for a sample (which caption, caption dropout, the latent drawn from the
stored posterior) comes from a generator seeded by ``(seed, epoch, sample)``, and the batch order of
an epoch from ``(seed, epoch)``. A resumed run therefore sees exactly the batches an uninterrupted run
would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from semroute.shared.errors import SemrouteError
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.text_store import TextCacheReader


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (SplitMix64 steps), stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def check_id_sources(text_cache: str, text_attrs: dict, latent_cache: str, latent_attrs: dict) -> None:
    """Ids that are record positions join correctly only when both caches were made from the same file
    content: two manifests without ``id`` listing the images in other orders would pair every caption with
    another sample's image. (Caches written before ids were described carry no ``sample_ids`` entry.)"""
    a, b = text_attrs.get("sample_ids") or {}, latent_attrs.get("sample_ids") or {}
    if not (a.get("positional") or b.get("positional")):
        return
    if a.get("content_sha256") is None or a.get("content_sha256") != b.get("content_sha256"):
        which = " and ".join(name for name, ids in ((text_cache, a), (latent_cache, b)) if ids.get("positional"))
        raise SemrouteError(
            f"{which} joined by record position (no 'id' in the data), but {text_cache} and {latent_cache} were "
            f"encoded from different data ({text_attrs.get('source')} sha256 {str(a.get('content_sha256'))[:12]}, "
            f"{latent_attrs.get('source')} sha256 {str(b.get('content_sha256'))[:12]}): positions would pair "
            "captions with other samples' images. Encode both from the same file, or give every record an 'id'")


def id_join_hint(text_only, image_only: list[str]) -> str | None:
    """Why ids left out of the join on both sides may be meant to join: how many of ``image_only`` (encoded
    images without a caption) equal one of ``text_only`` (caption ids without an image) up to surrounding
    whitespace and letter case (a CSV id " 001" and a tar key "001"; "IMG_1" and "img_1"), with an example;
    None when none does. Linear: one dict of the normalised ``text_only``."""
    by_norm: dict[str, str] = {}
    for sid in text_only:
        by_norm.setdefault(sid.strip().casefold(), sid)
    count, example, kinds = 0, None, set()
    for sid in image_only:
        match = by_norm.get(sid.strip().casefold())
        if match is None:
            continue
        count += 1
        example = example or (match, sid)
        if match.casefold() != sid.casefold():
            kinds.add("whitespace")
        if match.strip() != sid.strip():
            kinds.add("case")
    if not count:
        return None
    return (f"ids differ only by surrounding {'/'.join(k for k in ('whitespace', 'case') if k in kinds)}: {count} "
            f"of the {len(image_only)} encoded images without a caption would join one after str.strip()/casefold() "
            f"(e.g. text cache {example[0]!r}, latent cache {example[1]!r}); ids are joined exactly, so re-encode one "
            "side with ids that match the other's")


class PairedCaches(Dataset):
    """The samples present in both caches: one latent and one or more captions each.

    Items are requested as ``(sample, epoch)`` pairs (see :class:`EpochBatches`) and returned as dicts:
    ``text`` ``[n_tokens, L, D]`` (the null caption's features when dropped), ``latent`` ``[C, h, w]``
    (normalized, drawn from the stored posterior), ``sample_id``, ``caption`` (-1 when dropped).
    Nothing is loaded up front beyond the join (a few integers per sample), and each DataLoader worker
    opens the stores itself.
    """

    def __init__(self, text_cache: str, latent_cache: str, *, text_layers: list[int] | None, seed: int = 0,
                 caption_dropout: float = 0.1, shard_cache=None):
        # shard_cache: a shared.remote.ShardCache, for caches on object storage
        self.text = TextCacheReader(text_cache, layers=text_layers, shard_cache=shard_cache)
        self.latents = LatentCacheReader(latent_cache, shard_cache=shard_cache)
        check_id_sources(text_cache, self.text.attrs, latent_cache, self.latents.attrs)
        self.seed = seed
        self.caption_dropout = caption_dropout

        # Join: for each encoded image, the caption rows that share its sample id.
        index = self.text.index
        caption_ids = index.column("sample_id").to_pylist()
        by_id: dict[str, list[int]] = {}
        for c, sid in enumerate(caption_ids):
            by_id.setdefault(sid, []).append(c)
        positions, ptr, captions, image_only = [], [0], [], []
        for pos, sid in enumerate(self.latents.sample_ids):
            caps = by_id.get(sid)
            if caps:
                positions.append(pos)
                captions.extend(caps)
                ptr.append(len(captions))
            else:
                image_only.append(sid)
        text_only = by_id.keys() - set(self.latents.sample_ids)
        # Ids stay exact; ids left out on both sides are only compared normalised to say why.
        hint = id_join_hint(text_only, image_only) if text_only and image_only else None
        if not positions:
            examples = (f"e.g. {next(iter(by_id), None)!r} in the text cache, "
                        f"{next(iter(self.latents.sample_ids), None)!r} in the latent cache")
            raise SemrouteError(
                f"no sample id is in both {text_cache} ({len(by_id)} ids) and {latent_cache} "
                f"({len(self.latents)} encoded images; {examples}): "
                + (hint or "were they encoded from the same manifest?")
            )
        # some ids join and others would only after normalising: for train.py to print (never joined silently)
        self.join_warning: str | None = hint
        self.latent_pos = np.asarray(positions, dtype=np.int64)
        self.caption_ptr = np.asarray(ptr, dtype=np.int64)
        self.caption_idx = np.asarray(captions, dtype=np.int64)
        self.n_text_only = len(text_only)
        self.n_image_only = len(image_only)
        self._null: torch.Tensor | None = None
        self._null_bits: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.latent_pos)

    def use_text_layers(self, layers: list[int]) -> None:
        """Read only ``layers`` (hidden_states indices) of the text cache from now on: the ones the model uses
        (known once the model is built from what the caches hold). The join is kept; only the text reader,
        which opens its files lazily, is replaced."""
        if list(layers) != self.text.layers:
            self.text = type(self.text)(self.text.location, layers=list(layers), shard_cache=self.text.shard_cache)
            self._null, self._null_bits = None, None

    @property
    def null(self) -> torch.Tensor:
        if self._null is None:
            self._null = self.text.null()
        return self._null

    def bucket_ids(self) -> np.ndarray:
        """Latent bucket of each sample (batches never mix shapes)."""
        return np.asarray([self.latents._bucket[p] for p in self.latent_pos], dtype=np.int64)

    def text_shards(self) -> np.ndarray:
        """The text cache shard holding each sample's first caption (shard-local order, ``EpochBatches``)."""
        return self.text.shard_of(self.caption_idx[self.caption_ptr[:-1]])

    def text_lengths(self) -> np.ndarray:
        """Longest caption (tokens) of each sample, for length-aware batching."""
        lengths = self.text.lengths[self.caption_idx]
        return np.maximum.reduceat(lengths, self.caption_ptr[:-1])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.item(*key)

    def item(self, sample: int, epoch: int, *, bits: bool = False) -> dict:
        """Sample ``sample`` as drawn in ``epoch``. With ``bits`` the text is left as stored (``text`` the
        ``caption_bits`` features, ``text_scales`` the fp8 scales or None) for decoding on the device."""
        return self.items([sample], epoch, bits=bits)[0]

    def items(self, samples, epoch: int, *, bits: bool = False, text_into: Callable | None = None) -> list[dict]:
        """``item`` of every sample in ``samples`` (the same draws), their captions and latents read together
        (``captions_bits``, ``latents``: a round of concurrent requests each for caches on object storage).

        ``text_into`` (with ``bits``): called with each item's caption length, it returns where each caption
        goes (``text_rows``: the rows of a loader's reused batch buffer); stored captions are read into them."""
        samples = [int(s) for s in samples]
        out, generators = [], []
        for sample in samples:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, sample))
            caps = self.caption_idx[self.caption_ptr[sample]: self.caption_ptr[sample + 1]]
            pick = int(caps[int(torch.randint(len(caps), (1,), generator=g))])
            dropped = bool(torch.rand((), generator=g) < self.caption_dropout)
            generators.append(g)  # next: the latent's draw from the stored posterior
            out.append({"sample_id": self.latents.sample_ids[self.latent_pos[sample]],
                        "caption": -1 if dropped else pick})
        positions = [int(self.latent_pos[s]) for s in samples]
        for it, latent in zip(out, self.latents.latents(positions, generators)):
            it["latent"] = latent
        if self._null_bits is None and any(it["caption"] < 0 for it in out):
            self._null_bits = self.text.null_bits()  # read once, the first time a caption is dropped
        into = None
        if text_into is not None:
            lengths = [int(self.text.lengths[it["caption"]]) if it["caption"] >= 0 else self._null_bits[0].shape[0]
                       for it in out]
            into = [dest for dest, it in zip(text_into(lengths), out) if it["caption"] >= 0]
        stored = iter(self.text.captions_bits([it["caption"] for it in out if it["caption"] >= 0], into=into))
        for it in out:
            features, scales = self._null_bits if it["caption"] < 0 else next(stored)
            if bits:
                it["text"], it["text_scales"] = features, scales
            else:
                it["text"] = self.null if it["caption"] < 0 else self.text.decode_bits(features, scales)
        return out


@dataclass
class Batch:
    text: torch.Tensor  # [B, T, L, D] features, or as stored (bits) until decode_text
    text_mask: torch.Tensor  # [B, T] bool
    latents: torch.Tensor  # [B, C, h, w]
    sample_ids: list[str]
    captions: list[int]
    epoch: int
    index: int  # batch number within the epoch (this process's share)
    text_scales: torch.Tensor | None = None  # [B, T, L] fp8 scales while ``text`` holds fp8 codes
    text_tokens: int = 0  # real (unpadded) caption tokens in the batch, known without a device sync
    release: Callable | None = field(default=None, repr=False, compare=False)  # hands a pinned slot back

    def _tensors(self) -> dict:
        return {"text": self.text, "text_mask": self.text_mask, "latents": self.latents,
                "text_scales": self.text_scales}

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (pin_memory=True) so host-to-GPU copies are async."""
        return replace(self, **{k: v.pin_memory() for k, v in self._tensors().items() if v is not None})

    def to(self, device) -> "Batch":
        return replace(self, release=None, **{k: v.to(device, non_blocking=True)
                                              for k, v in self._tensors().items() if v is not None})

    def decode_text(self, reader: TextCacheReader) -> "Batch":
        """Stored bits -> features (fp8 codes x scales; a no-op cast for bf16), wherever the tensors are."""
        return replace(self, text=reader.decode_bits(self.text, self.text_scales), text_scales=None)


class TextBuckets:
    """Caption lengths padded up to a few sizes, so a compiled model sees few shapes (the pads are masked).

    ``none``: pad to the batch's longest (what eager training wants); ``pow2``: the next power of two, at
    least 16; an integer ``m``: the next multiple of ``m``.
    """

    def __init__(self, spec: str | int | None = "none"):
        if spec in (None, "none"):
            self.multiple = None
        elif spec == "pow2":
            self.multiple = "pow2"
        elif isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
            self.multiple = spec
        else:
            raise SemrouteError(f"text_buckets {spec!r}: use none, pow2 or a positive integer (pad to a multiple)")

    def __call__(self, n: int) -> int:
        if self.multiple is None:
            return n
        if self.multiple == "pow2":
            return max(16, 1 << (max(n, 1) - 1).bit_length())
        return -(-n // self.multiple) * self.multiple


class HostSlot:
    """Reusable host buffers for one batch (pinned on CUDA hosts), grown to the largest batch seen.

    Pinning is a slow, synchronising allocation; a few slots allocated once and refilled avoid it per batch.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[name] = buf
        return buf[:n].view(dtype).view(shape)


def text_rows(slot: HostSlot, lengths: list[int], row_shape: tuple[int, ...], dtype: torch.dtype,
              buckets: TextBuckets | None = None) -> list[torch.Tensor]:
    """Where ``collate`` puts each caption in ``slot``'s text buffer (``[:n]`` of each row), for a reader to fill
    in place; ``collate`` then finds them there and copies nothing."""
    text = slot.tensor("text", (len(lengths), (buckets or TextBuckets())(max(lengths)), *row_shape), dtype)
    return [text[row, :n] for row, n in enumerate(lengths)]


def collate(items: list[dict], epoch: int, index: int, *, buckets: TextBuckets | None = None,
            slot: HostSlot | None = None) -> Batch:
    """Items -> one Batch, captions right-padded with zeros (to a bucket size if given), into ``slot``'s
    buffers if given (else new tensors)."""
    lengths = [it["text"].shape[0] for it in items]
    B, T = len(items), (buckets or TextBuckets())(max(lengths))
    first = items[0]

    def new(name, shape, dtype):
        return slot.tensor(name, shape, dtype) if slot is not None else torch.empty(shape, dtype=dtype)

    text = new("text", (B, T, *first["text"].shape[1:]), first["text"].dtype)  # [B, T, L, D]
    mask = new("mask", (B, T), torch.bool)  # [B, T]
    scales = (new("scales", (B, T, *first["text_scales"].shape[1:]), torch.float32)  # [B, T, L]
              if first.get("text_scales") is not None else None)
    latents = new("latents", (B, *first["latent"].shape), first["latent"].dtype)  # [B, C, h, w]
    for row, (it, n) in enumerate(zip(items, lengths)):
        dst = text[row, :n]
        if it["text"].data_ptr() != dst.data_ptr():  # else read there already (``text_rows``)
            dst.copy_(it["text"])
        text[row, n:] = 0
        mask[row, :n] = True
        mask[row, n:] = False
        if scales is not None:
            scales[row, :n] = it["text_scales"]
            scales[row, n:] = 0
        latents[row] = it["latent"]
    return Batch(text, mask, latents, [it["sample_id"] for it in items], [it["caption"] for it in items], epoch,
                 index, text_scales=scales, text_tokens=sum(lengths))


class EpochBatches:
    """This process's batches, epoch after epoch, from any starting position.

    Per epoch: samples shuffled with ``(seed, epoch)``, grouped by latent bucket, cut into full batches
    (optionally sorted by caption length within windows of 64 batches, to cut padding), the batch order
    shuffled. That gives one *global* sequence of batches, epoch after epoch, that does not depend on the
    number of processes. A micro-step of ``world_size`` processes takes the next ``world_size`` batches of
    it, process ``r`` the ``r``-th; the position is recorded globally (epoch, index of the next batch), so
    a run resumes on another number of processes and continues the same sequence (elastic resume). All
    processes take the same number of steps; within an epoch no two batches share a sample.

    Shard-local order (``blocks``: each sample's cache shard; ``window`` shards at a time), for caches on
    object storage: the shards are shuffled, taken ``window`` at a time, the samples of a window shuffled
    among themselves (sorted by length within it under ``length_batching``) and cut into batches, and the
    batches kept in that order. A batch then draws from a few shards, so its captions come in a few long
    ranged GETs instead of one request each (the cost of a cold read from object storage; bench/RESULTS.md),
    and a shard cache (``--cache-dir``) downloads each shard once per epoch. Batches are less mixed than
    under a full shuffle: samples of a shard were encoded together (neighbours in the manifest), so a
    manifest sorted by source puts one source in a batch; a wider window mixes more.
    """

    def __init__(self, buckets: np.ndarray, lengths: np.ndarray, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, length_batching: bool = False, samples: np.ndarray | None = None,
                 blocks: np.ndarray | None = None, window: int = 1):
        # ``samples``: the dataset indices to train on (the rest is held out); ``buckets`` and ``lengths``
        # describe those samples, in that order. Batches hold dataset indices either way.
        self.samples = np.arange(len(buckets)) if samples is None else np.asarray(samples, dtype=np.int64)
        if len(self.samples) != len(buckets):
            raise ValueError(f"{len(self.samples)} samples but {len(buckets)} bucket ids")
        self.buckets = buckets
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.length_batching = length_batching
        self.blocks = None if blocks is None else np.asarray(blocks, dtype=np.int64)
        if self.blocks is not None and len(self.blocks) != len(buckets):
            raise ValueError(f"{len(self.blocks)} shard ids but {len(buckets)} samples")
        self.window = int(window)
        if self.window < 1:
            raise ValueError(f"window {window}: at least one shard")
        if self.per_epoch() == 0:
            raise SemrouteError(
                f"{len(buckets)} samples cannot fill one batch of {batch_size} per process on {world_size} "
                "process(es); lower batch_size"
            )

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """Every batch of ``epoch`` (all processes' together), in order."""
        rng = np.random.default_rng(mix_seed(self.seed, epoch, 0xBA7C4))
        order = rng.permutation(len(self.buckets))
        group = None
        if self.blocks is not None:  # shard-local: windows of shuffled shards, each window's samples shuffled
            ids = np.unique(self.blocks)
            place = np.zeros(int(ids[-1]) + 1, dtype=np.int64)
            place[ids[rng.permutation(len(ids))]] = np.arange(len(ids))
            group = place[self.blocks] // self.window  # each sample's window
            order = order[np.argsort(group[order], kind="stable")]
        batches: list[np.ndarray] = []
        for b in np.unique(self.buckets):
            members = order[self.buckets[order] == b]
            n_full = len(members) // self.batch_size * self.batch_size
            members = members[:n_full]
            if self.length_batching and group is not None:  # sorted by length within each shard window
                members = members[np.lexsort((self.lengths[members], group[members]))]
            elif self.length_batching:
                window = self.batch_size * 64
                for s in range(0, len(members), window):
                    chunk = members[s: s + window]
                    members[s: s + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [members[i: i + self.batch_size] for i in range(0, n_full, self.batch_size)]
        if self.blocks is not None:  # kept in the order of the shard windows (buckets interleaved by it)
            when = np.empty(len(order), dtype=np.int64)
            when[order] = np.arange(len(order))
            return [self.samples[batches[i]] for i in np.argsort([when[b].min() for b in batches], kind="stable")]
        return [self.samples[batches[i]] for i in rng.permutation(len(batches))]

    @property
    def n_batches(self) -> int:
        """Batches per epoch, all processes together."""
        counts = np.bincount(self.buckets)
        return int(sum(c // self.batch_size for c in counts))

    def per_epoch(self) -> int:
        """Micro-steps per epoch (the last step of an epoch may take batches of the next one)."""
        return self.n_batches // self.world_size

    def after(self, epoch: int, index: int) -> tuple[int, int]:
        """The job's position after the micro-step in which this process took batch ``(epoch, index)``:
        the next batch no process has taken (the same on every process)."""
        g = epoch * self.n_batches + index - self.rank + self.world_size
        return divmod(g, self.n_batches)

    def iterate(self, start_epoch: int = 0, start_index: int = 0):
        """Yield this process's ``(epoch, index, samples)`` forever, the job being at ``(start_epoch,
        start_index)`` of the global sequence: batches ``start + rank``, ``start + rank + world_size``, ..."""
        n = self.n_batches
        g = start_epoch * n + start_index + self.rank
        cached: tuple[int, list] | None = None
        while True:
            epoch, index = divmod(g, n)
            if cached is None or cached[0] != epoch:
                cached = (epoch, self.epoch(epoch))
            yield epoch, index, cached[1][index]
            g += self.world_size


class BatchLoader:
    """This process's batches from any ``(epoch, index)`` position, assembled off the training thread.

    It remembers nothing itself: the caller records the ``(epoch, index)`` of the last batch it consumed
    and restarts from the next one on resume. Text comes as stored (``Batch.decode_text`` after the copy
    to the device decodes it), padded per ``buckets``.

    ``workers``: ``thread`` (default) builds batches in ``num_workers`` threads of this process, into
    reused (pinned, with ``pin_memory``) host buffers: reading shards (``pread``), checking crc32c and
    copying arrays release the GIL, so they run beside the step; ``process`` uses a DataLoader with
    ``num_workers`` worker processes. ``num_workers=0`` builds each batch in the caller's thread when asked.
    A failure while building a batch is raised in the caller as the reader's own exception.
    """

    MODES = ("thread", "process")

    def __init__(self, dataset: PairedCaches, plan: EpochBatches, *, num_workers: int, start_epoch: int = 0,
                 start_index: int = 0, pin_memory: bool = False, workers: str = "thread",
                 buckets: TextBuckets | None = None, depth: int = 2):
        if workers not in self.MODES:
            raise SemrouteError(f"loader workers {workers!r}: use thread or process")
        self.dataset = dataset
        self.plan = plan
        self.num_workers = num_workers
        self.start = (start_epoch, start_index)
        self.pin_memory = pin_memory
        self.workers = workers
        self.buckets = buckets or TextBuckets()
        self.depth = depth

    def build(self, epoch: int, index: int, samples, slot: HostSlot | None = None) -> Batch:
        into = None
        if slot is not None:  # captions read straight into the slot's buffer (one copy of the bytes fewer)
            row, dtype = self.dataset.text.bits_row()
            into = lambda lengths: text_rows(slot, lengths, row, dtype, self.buckets)  # noqa: E731
        items = self.dataset.items(samples, epoch, bits=True, text_into=into)
        return collate(items, epoch, index, buckets=self.buckets, slot=slot)

    def __iter__(self):
        if self.num_workers == 0:
            return (self.build(*b) for b in self.plan.iterate(*self.start))
        if self.workers == "thread":
            return _ThreadedBatches(self)
        return self._processes()

    def _processes(self):
        from torch.utils.data import DataLoader, IterableDataset

        loader_self, plan, start = self, self.plan, self.start

        class _Batches(IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, nw = (info.id, info.num_workers) if info else (0, 1)
                for n, (epoch, index, samples) in enumerate(plan.iterate(*start)):
                    if n % nw == wid:  # worker w builds every nw-th batch; DataLoader interleaves them in order
                        try:
                            batch = loader_self.build(epoch, index, samples)
                        except SemrouteError as err:
                            # Handed over as a value: raised in a worker, torch would re-raise it wrapped in
                            # "Caught ... in DataLoader worker process N" and the worker's traceback.
                            yield _Failed(err)
                            return
                        yield batch

        loader = DataLoader(_Batches(), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=2 * self.depth, persistent_workers=False)
        return _Unwrapped(iter(loader))


class _Unwrapped:
    """Batches from a DataLoader; a :class:`_Failed` from a worker is raised here as the reader's own error."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        shutdown = getattr(self.it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _ThreadedBatches:
    """The iterator of a threaded :class:`BatchLoader`: thread ``w`` builds batches ``n % workers == w``
    into its own ring of host slots and queue; batches come out in plan order.

    A slot returns to its ring when the consumer calls ``batch.release(event)`` (after issuing the copy
    to the device; the builder waits for that copy's CUDA ``event`` before refilling the slot) or, when the
    host buffers are not pinned, never: then every batch gets new tensors, since the step may still use them.
    """

    POLL_S = 0.1
    JOIN_S = 60.0  # close() waits this long for a thread to finish the batch it is building

    def __init__(self, loader: BatchLoader):
        self.loader = loader
        n = loader.num_workers
        self.stop = threading.Event()
        self.queues = [queue.Queue(maxsize=loader.depth) for _ in range(n)]
        self.rings: list[queue.Queue] = [queue.Queue() for _ in range(n)]
        if loader.pin_memory:
            for ring in self.rings:
                for _ in range(loader.depth + 1):  # queued + being built; a slot whose copy is still
                    # running is back in the ring with its event, which the builder waits for
                    ring.put((HostSlot(pin=True), None))
        self.threads = [threading.Thread(target=self._work, args=(w, n), daemon=True, name=f"semroute-loader-{w}")
                        for w in range(n)]
        self.n = 0
        _track(self)
        for t in self.threads:
            t.start()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=self.POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _slot(self, w: int) -> HostSlot | None:
        if not self.loader.pin_memory:
            return None
        while not self.stop.is_set():
            try:
                slot, event = self.rings[w].get(timeout=self.POLL_S)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()  # the copy out of this slot has finished (waits in this thread only)
            return slot
        return None

    def _work(self, w: int, n_workers: int) -> None:
        try:
            for n, (epoch, index, samples) in enumerate(self.loader.plan.iterate(*self.loader.start)):
                if n % n_workers != w:
                    continue
                slot = self._slot(w)
                if self.stop.is_set():
                    return
                batch = self.loader.build(epoch, index, samples, slot)
                if slot is not None:
                    ring = self.rings[w]
                    batch.release = lambda event=None, slot=slot, ring=ring: ring.put((slot, event))
                if not self._put(self.queues[w], batch):
                    return
        except BaseException as err:  # handed to the consumer, raised there as itself
            self._put(self.queues[w], _Failed(err))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        w = self.n % len(self.queues)
        while True:
            try:
                item = self.queues[w].get(timeout=self.POLL_S)
                break
            except queue.Empty:
                if not self.threads[w].is_alive() and self.queues[w].empty():
                    raise RuntimeError(f"loader thread {w} ended without a batch or an error") from None
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        self.n += 1
        return item

    def close(self) -> None:
        """Stop the builder threads and wait for them. A daemon thread still inside a torch call when
        the interpreter exits is ended there by ``pthread_exit``, whose unwinding through torch's C++
        makes it abort the process (``terminate called without an active exception``, exit status 134)."""
        self.stop.set()
        _running.discard(self)
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(self.JOIN_S)

    def __del__(self):
        self.stop.set()


# Threaded loaders not closed yet. Their threads hold them (``self._work``), so ``__del__`` does not
# run while they build; at exit they are closed before the interpreter ends daemon threads. The exit
# hook moves to the end of atexit's list with each new loader, after the caches' libraries (zarr,
# fsspec) registered theirs, so it runs before those (last registered first) while the readers work.
_running: weakref.WeakSet[_ThreadedBatches] = weakref.WeakSet()


def _track(batches: _ThreadedBatches) -> None:
    _running.add(batches)
    atexit.unregister(_close_running_loaders)
    atexit.register(_close_running_loaders)


def _close_running_loaders() -> None:
    for batches in list(_running):
        batches.close()
