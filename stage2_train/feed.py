"""Batches onto the training device one step ahead, so the step never waits on a copy.

On CUDA the host-to-device copy of batch ``k + 1`` is issued on a side stream while step ``k`` runs on
the default stream; a CUDA event orders the step after its own batch's copy, and the same event tells
the loader when the pinned host buffer may be refilled. The text is moved as stored (bf16 bit
patterns, fp8 codes + scales) and decoded on the device after the copy. Nothing here waits for the
device from the training thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from semroute.shared.text_store import TextCacheReader
from semroute.stage2_train.data import Batch


class DeviceFeed:
    """Iterates device-ready, decoded :class:`Batch` es from host batches.

    ``wait_seconds`` adds up the time the calling thread blocked on the host loader (the loader's share of
    the step); ``take_wait()`` returns it and starts a new count.
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device | str, reader: TextCacheReader):
        self.host = iter(batches)
        self.device = torch.device(device)
        self.reader = reader
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.wait_seconds = 0.0
        self._ahead: tuple[Batch, torch.cuda.Event | None] | None = None

    def _next_host(self) -> Batch:
        t0 = time.perf_counter()
        batch = next(self.host)
        self.wait_seconds += time.perf_counter() - t0
        return batch

    def _issue(self, host: Batch) -> tuple[Batch, torch.cuda.Event | None]:
        """Start moving ``host`` to the device; returns the device batch and the event its copy records."""
        if self.stream is None:
            batch = host.to(self.device)
            if host.release is not None:
                host.release()
            return batch, None
        with torch.cuda.stream(self.stream):
            batch = host.to(self.device)  # non_blocking copies from pinned buffers, on the side stream
            copied = torch.cuda.Event()
            copied.record(self.stream)
        if host.release is not None:
            host.release(copied)  # the loader refills that host slot only after this copy
        return batch, copied

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._ahead is None:
            self._ahead = self._issue(self._next_host())
        batch, copied = self._ahead
        self._ahead = self._issue(self._next_host())  # the next batch's copy overlaps this step
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)  # device-side ordering; the host does not wait
            for t in (batch.text, batch.text_mask, batch.latents, batch.text_scales):
                if t is not None:
                    t.record_stream(current)  # allocated on the side stream, used on this one
        return batch.decode_text(self.reader)

    def take_wait(self) -> float:
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait

    def close(self) -> None:
        close = getattr(self.host, "close", None)
        if close is not None:
            close()
