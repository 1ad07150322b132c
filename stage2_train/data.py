"""Training data from the two caches: join by sample id, batch same-shape latents, pad text.

Every random choice made for a sample (which caption, caption dropout, the latent drawn from the
stored posterior) comes from a generator seeded by ``(seed, epoch, sample)``, and the batch order of
an epoch from ``(seed, epoch)``. A resumed run therefore sees exactly the batches an uninterrupted run
would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from semroute.shared.errors import SemrouteError
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.store import TextCacheReader, pad_batch


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing integers (SplitMix64 steps), stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class PairedCaches(Dataset):
    """The samples present in both caches: one latent and one or more captions each.

    Items are requested as ``(sample, epoch)`` pairs (see :class:`EpochBatches`) and returned as dicts:
    ``text`` ``[n_tokens, L, D]`` (the null caption's features when dropped), ``latent`` ``[C, h, w]``
    (normalized, drawn from the stored posterior), ``sample_id``, ``caption`` (-1 when dropped).
    Nothing is loaded up front beyond the join (a few integers per sample), and each DataLoader worker
    opens the stores itself.
    """

    def __init__(self, text_cache: str, latent_cache: str, *, text_layers: list[int] | None, seed: int = 0,
                 caption_dropout: float = 0.1):
        self.text = TextCacheReader(text_cache, layers=text_layers)
        self.latents = LatentCacheReader(latent_cache)
        self.seed = seed
        self.caption_dropout = caption_dropout

        # Join: for each encoded image, the caption rows that share its sample id.
        index = self.text.index
        caption_ids = index.column("sample_id").to_pylist()
        by_id: dict[str, list[int]] = {}
        for c, sid in enumerate(caption_ids):
            by_id.setdefault(sid, []).append(c)
        positions, ptr, captions = [], [0], []
        for pos, sid in enumerate(self.latents.sample_ids):
            caps = by_id.get(sid)
            if caps:
                positions.append(pos)
                captions.extend(caps)
                ptr.append(len(captions))
        if not positions:
            raise SemrouteError(
                f"no sample id is in both {text_cache} ({len(by_id)} ids) and {latent_cache} "
                f"({len(self.latents)} encoded images): were they encoded from the same manifest?"
            )
        self.latent_pos = np.asarray(positions, dtype=np.int64)
        self.caption_ptr = np.asarray(ptr, dtype=np.int64)
        self.caption_idx = np.asarray(captions, dtype=np.int64)
        self.n_text_only = len(set(by_id) - set(self.latents.sample_ids))
        self.n_image_only = len(self.latents) - len(positions)
        self._null: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.latent_pos)

    @property
    def null(self) -> torch.Tensor:
        if self._null is None:
            self._null = self.text.null()
        return self._null

    def bucket_ids(self) -> np.ndarray:
        """Latent bucket of each sample (batches never mix shapes)."""
        return np.asarray([self.latents._bucket[p] for p in self.latent_pos], dtype=np.int64)

    def text_lengths(self) -> np.ndarray:
        """Longest caption (tokens) of each sample, for length-aware batching."""
        lengths = self.text.lengths[self.caption_idx]
        return np.maximum.reduceat(lengths, self.caption_ptr[:-1])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        sample, epoch = key
        g = torch.Generator().manual_seed(_seed(self.seed, epoch, sample))
        caps = self.caption_idx[self.caption_ptr[sample]: self.caption_ptr[sample + 1]]
        pick = int(caps[int(torch.randint(len(caps), (1,), generator=g))])
        dropped = bool(torch.rand((), generator=g) < self.caption_dropout)
        text = self.null if dropped else self.text.caption(pick)
        latent = self.latents.latent(int(self.latent_pos[sample]), generator=g)
        return {"text": text, "latent": latent, "sample_id": self.latents.sample_ids[self.latent_pos[sample]],
                "caption": -1 if dropped else pick}


@dataclass
class Batch:
    text: torch.Tensor  # [B, T, L, D]
    text_mask: torch.Tensor  # [B, T] bool
    latents: torch.Tensor  # [B, C, h, w]
    sample_ids: list[str]
    captions: list[int]
    epoch: int
    index: int  # batch number within the epoch (this process's share)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (pin_memory=True) so host-to-GPU copies are async."""
        return Batch(self.text.pin_memory(), self.text_mask.pin_memory(), self.latents.pin_memory(), self.sample_ids,
                     self.captions, self.epoch, self.index)

    def to(self, device) -> "Batch":
        return Batch(self.text.to(device, non_blocking=True), self.text_mask.to(device, non_blocking=True),
                     self.latents.to(device, non_blocking=True), self.sample_ids, self.captions, self.epoch,
                     self.index)


def collate(items: list[dict], epoch: int, index: int) -> Batch:
    text, mask = pad_batch([it["text"] for it in items])
    return Batch(text, mask, torch.stack([it["latent"] for it in items]), [it["sample_id"] for it in items],
                 [it["caption"] for it in items], epoch, index)


class EpochBatches:
    """This process's batches, epoch after epoch, from any starting position.

    Per epoch: samples shuffled with ``(seed, epoch)``, grouped by latent bucket, cut into full batches
    (optionally sorted by caption length within windows of 64 batches, to cut padding), the batch order
    shuffled, and batch ``k`` given to process ``k % world_size``. Every process gets the same number of
    batches, so all take the same number of steps; batches of different processes never share a sample.
    """

    def __init__(self, buckets: np.ndarray, lengths: np.ndarray, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, length_batching: bool = False):
        self.buckets = buckets
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.length_batching = length_batching
        if self.per_epoch() == 0:
            raise SemrouteError(
                f"{len(buckets)} samples cannot fill one batch of {batch_size} per process on {world_size} "
                "process(es); lower batch_size"
            )

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(_seed(self.seed, epoch, 0xBA7C4))
        order = rng.permutation(len(self.buckets))
        batches: list[np.ndarray] = []
        for b in np.unique(self.buckets):
            members = order[self.buckets[order] == b]
            n_full = len(members) // self.batch_size * self.batch_size
            members = members[:n_full]
            if self.length_batching:
                window = self.batch_size * 64
                for s in range(0, len(members), window):
                    chunk = members[s: s + window]
                    members[s: s + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [members[i: i + self.batch_size] for i in range(0, n_full, self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size
        return batches[self.rank:: self.world_size][:per_rank]

    def per_epoch(self) -> int:
        counts = np.bincount(self.buckets)
        return int(sum(c // self.batch_size for c in counts)) // self.world_size

    def iterate(self, start_epoch: int = 0, start_index: int = 0):
        """Yield ``(epoch, index, samples)`` forever from the given position."""
        epoch, index = start_epoch, start_index
        while True:
            batches = self.epoch(epoch)
            for k in range(index, len(batches)):
                yield epoch, k, batches[k]
            epoch, index = epoch + 1, 0


class BatchLoader:
    """A DataLoader over :class:`EpochBatches`, remembering nothing itself: the caller records the
    ``(epoch, index)`` of the last batch it consumed and restarts from the next one on resume."""

    def __init__(self, dataset: PairedCaches, plan: EpochBatches, *, num_workers: int, start_epoch: int = 0,
                 start_index: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.plan = plan
        self.num_workers = num_workers
        self.start = (start_epoch, start_index)
        self.pin_memory = pin_memory

    def __iter__(self):
        from torch.utils.data import DataLoader, IterableDataset

        dataset, plan, start = self.dataset, self.plan, self.start

        class _Batches(IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                wid, nw = (info.id, info.num_workers) if info else (0, 1)
                for n, (epoch, index, samples) in enumerate(plan.iterate(*start)):
                    if n % nw == wid:  # worker w builds every nw-th batch; DataLoader interleaves them in order
                        yield collate([dataset[(int(s), epoch)] for s in samples], epoch, index)

        loader = DataLoader(_Batches(), batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=4 if self.num_workers else None,
                            persistent_workers=False)
        return iter(loader)
