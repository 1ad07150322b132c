"""The skeleton of an encode run, which ``encode-text`` and ``encode-images`` fill in.

    1. plan, then create, resume or grow the cache      ``plan_and_create``  (rank 0 decides: ``decide``)
    2. encode this process's pending shards, handing    ``prepare``, ``encode``
       each finished one to a background writer thread
    3. finish (rank 0): every flag set -> "complete"    ``finish``
    4. a summary dict, printed by the CLI               ``summary`` (on top of ``base_summary``)

Under ``accelerate launch`` every process runs the same steps on its own shards; the store's done flags
make any step safe to repeat after a crash (``--resume``).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable

from semroute.shared.distributed import ProcessInfo, process_info
from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.fingerprint import require_match
from semroute.shared.interrupts import stoppable
from semroute.shared.lock import OutputLock
from semroute.shared.integrity import INDEX
from semroute.shared.remote import STATS, is_url, set_storage_options
from semroute.shared.sources import require_local_inputs
from semroute.shared.store import check_seal, dir_size, file_exists, interrupted_create, join, store_exists


class ShardWriterThread:
    """Writes finished shards (``writer.write_shard(shard, payload)``) on a background thread so the next
    forward passes do not wait for disk.

    At most ``depth`` shards wait in the queue (bounding memory); an error on the thread is re-raised
    in the caller at the next ``put`` or when the ``with`` block ends. Leaving the block by an exception
    still lands the shards already queued (their flags are set), so a resume keeps them.
    """

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list = []
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            shard, rows = item
            try:
                self.writer.write_shard(shard, rows)
                self.written.append(shard)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                self.error = err

    def put(self, shard, rows) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, rows))

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error

    def __enter__(self) -> ShardWriterThread:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_error=exc_type is None)


class ShardSizes:
    """An encode config's ``shard_mb`` and ``chunk_kb`` (EncodeTextConfig, EncodeImagesConfig) in bytes, as the
    stores take them."""

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 2**20)

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_kb * 1024)


# ---------------------------------------------------------------------------------------------
# Create, resume or append?
# ---------------------------------------------------------------------------------------------
def check_flags(cfg) -> None:
    """Refuse contradictory write flags and an --out with a URL's slash missing, before any model loads."""
    is_url(cfg.out)  # raises for s3:/x.zarr (a local folder named "s3:" would be written)
    if cfg.overwrite and (cfg.resume or cfg.append):
        keep = "--append" if cfg.append else "--resume"
        raise SemrouteError(f"--overwrite deletes {cfg.out} and encodes it again, {keep} keeps what it holds: "
                            "give one of them")
    if cfg.resume and cfg.append:
        raise SemrouteError("--append continues an interrupted append by itself (run the same --append again); "
                            "drop --resume")


def decide(cfg, open_writer: Callable, want: dict, input_sha256: str, *, kind: str, inputs: str, changed: str) -> str:
    """What to do at ``cfg.out``: ``"create"``, ``"resume"`` (encode the shards still missing) or
    ``"append"`` (grow a finished cache by ``cfg.data``, or grow it again after a crash while growing).

    Refuses what the flags do not allow: an existing cache without ``--resume``/``--overwrite``; a resume
    or append whose fingerprint differs from ``want``; a resume from other inputs (``input_sha256``;
    ``inputs``/``changed`` word it: "made from other {inputs} than DATA now holds ({changed})"); an
    append to a missing or unfinished cache. A resume or append never empties an existing cache of ``kind``:
    only a create killed before anything was encoded (``store.interrupted_create``) is started again; one
    missing its index otherwise, or a finished one that no longer matches its seal, is refused.
    """
    exists = store_exists(cfg.out)
    restart = exists and (cfg.resume or cfg.append) and not cfg.overwrite and interrupted_create(cfg.out, kind)
    if cfg.append:
        if not exists:
            raise SemrouteError(f"cannot append to {cfg.out}: there is no cache there (run without --append to "
                                "create it)")
        if restart:
            raise SemrouteError(f"cannot append to {cfg.out}: the run that created it stopped before it was set up "
                                "(nothing was encoded yet). Finish it first: run it again with --resume (it starts "
                                "over), then --append.")
        attrs = _reopen(cfg, open_writer, "append to")
        require_match(attrs["fingerprint"], want, sorted(want), f"cannot append to {cfg.out}: the existing cache")
        segments = attrs.get("segments") or []
        if len(segments) > 1 and segments[-1]["input_sha256"] == input_sha256 and not attrs.get("complete"):
            return "resume"  # this append's shards are planned: encode the ones still missing
        if (attrs.get("appending") or {}).get("input_sha256") == input_sha256:
            return "append"  # stopped while growing the arrays: grow them again
        if not attrs.get("complete"):
            raise SemrouteError(f"cannot append to {cfg.out}: it is not complete. Finish it first (the run that made "
                                "it with --resume, or the unfinished --append with the same data).")
        parts = segments or [{"input_sha256": attrs.get("input_sha256"), "source": attrs.get("source")}]
        for k, part in enumerate(parts):
            if part.get("input_sha256") == input_sha256:  # (a rerun of an append that had finished, say)
                raise SemrouteError(f"nothing to append: {cfg.out} already holds these {inputs} (part {k + 1} of "
                                    f"{len(parts)}, from {part.get('source')}), and it is complete")
        return "append"
    if restart:
        return "create"  # a create killed before anything was encoded: nothing in it to keep
    if exists and cfg.resume and not cfg.overwrite:
        attrs = _reopen(cfg, open_writer, "resume")
        require_match(attrs["fingerprint"], want, sorted(want), f"cannot resume {cfg.out}: the existing cache")
        if attrs["input_sha256"] != input_sha256:
            segments = attrs.get("segments") or []
            grown = (f" It was last grown by --append of {segments[-1].get('source')}: a --resume (to rewrite a "
                     "lost shard, say) takes that data." if len(segments) > 1 else "")
            raise SemrouteError(f"cannot resume {cfg.out}: it was made from other {inputs} than {cfg.data} now "
                                f"holds ({changed}).{grown} Start a new cache or pass --overwrite.")
        return "resume"
    if exists and not cfg.overwrite:
        raise SemrouteError(f"{cfg.out} already exists. Pass --resume to continue it, or --overwrite to replace it.")
    return "create"


def _reopen(cfg, open_writer: Callable, doing: str) -> dict:
    """The attributes of the cache at ``cfg.out`` that a resume or append (``doing``) continues, after checking
    that it has its index and, if finished, still matches its seal (``check_seal``)."""
    writer = open_writer(cfg.out)
    if not file_exists(cfg.out, INDEX):
        raise CacheDamaged(f"cannot {doing} {cfg.out}: {join(cfg.out, INDEX)} is missing (deleted, or lost in a copy), "
                           "and the cache is not the remains of an interrupted create, so it is not started again "
                           "(that would delete what was encoded). Restore that file, or pass --overwrite to encode "
                           "the cache again from scratch.")
    check_seal(cfg.out, writer.group, writer.attrs)
    return writer.attrs


def refuse_known_ids(cfg, have: list[str], new: Iterable[tuple[str, int]], segments: list[dict], first: str,
                     noun: str) -> None:
    """``--append``: sample ids must be unique over the grown cache. ``have``: the cache's ids, one per
    ``noun`` (caption, record) in index order; ``new``: ``(sample id, manifest line)`` of the data to add;
    ``segments``: the cache's parts, each starting at index ``segment[first]``."""
    known: dict[str, int] = {}
    for k, sid in enumerate(have):
        known.setdefault(sid, k)
    for sid, line in new:
        if sid in known:
            k = known[sid]
            part = max((s for s in segments if s[first] <= k), key=lambda s: s[first])
            raise SemrouteError(f"cannot append {cfg.data} to {cfg.out}: sample id {sid!r} (line {line}) is already "
                                f"in the cache, from {part['source']} ({noun} {k}). Sample ids must be unique "
                                "across all the data of a cache.")


# ---------------------------------------------------------------------------------------------
# The skeleton
# ---------------------------------------------------------------------------------------------
class EncodeRun:
    """One encode run over ``cfg`` (an ``EncodeTextConfig`` or ``EncodeImagesConfig``) on this process.

    Subclasses fill in the steps; ``run`` calls them in order and moves the results between processes.
    ``open_writer(location)`` reopens the cache's writer (``TextCacheWriter.open``, ...).
    """

    open_writer: Callable

    def __init__(self, cfg, proc: ProcessInfo | None = None):
        self.cfg = cfg
        if cfg.storage_options:  # for every URL of the run, --out too (as stage2_train/train.py applies them)
            set_storage_options(cfg.storage_options)
        self.proc = proc or process_info()
        self.show = bool(cfg.progress) and self.proc.is_main
        check_flags(cfg)  # these three before the model loads (seconds to minutes)
        require_local_inputs(cfg.data, cfg.storage_options)
        if not cfg.estimate:  # a busy --out (``run`` takes its lock)
            self.proc.run_on_main(lambda: OutputLock(cfg.out).check_free() or True)

    # -- the steps -------------------------------------------------------------------------------
    def plan_and_create(self) -> dict:
        """Plan, then create, reopen or grow the cache; under ``--estimate`` return ``{"estimate": ...}``
        instead (rank 0's result; ``self.proc.run_on_main`` runs a step there and shares its outcome)."""
        raise NotImplementedError

    def my_units(self, writer) -> list:
        """This process's share of the cache's shards (all of them, pending or not)."""
        raise NotImplementedError

    def prepare(self, writer) -> None:
        """Before the timed part: load what encoding needs (the model, the offsets)."""

    def encode(self, writer, units: list, background: ShardWriterThread) -> dict:
        """Encode ``units`` (pending shards), ``background.put`` each one whole; returns this process's counts."""
        raise NotImplementedError

    def finish(self, writer, elapsed: float) -> dict:
        """Rank 0, after every process: mark the cache complete; returns counts for the summary."""
        return writer.finish(world_size=self.proc.world_size, encode_seconds=round(elapsed, 3)) or {}

    def summary(self, writer, finished: dict, stats: list[dict], elapsed: float, planned: dict) -> dict:
        """The command's summary (rank 0), on top of ``base_summary``."""
        raise NotImplementedError

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """The steps in order, the main process holding ``--out``'s lock (shared/lock.py) throughout, so that a
        second encode into the same cache is refused before it plans, creates or deletes anything."""
        again = "the same --append again" if self.cfg.append else "the same command with --resume"
        with stoppable(f"the shards written to {self.cfg.out} are kept: run {again} to finish it"):
            lock = OutputLock(self.cfg.out)  # (removed on the way out, a SIGTERM's too: shared/interrupts.py)
            if not self.cfg.estimate:
                self.proc.run_on_main(lambda: bool(lock.acquire()))  # every process raises if it is busy
            try:
                return self._run()
            finally:
                lock.release()

    def _run(self) -> dict:
        proc = self.proc
        planned = self.plan_and_create() or {}
        if self.cfg.estimate:
            return planned if proc.is_main else {}

        writer = self.open_writer(self.cfg.out)
        pending = writer.pending(self.my_units(writer))
        self.prepare(writer)
        t0 = time.perf_counter()
        with ShardWriterThread(writer) as background:
            stats = self.encode(writer, pending, background)
        elapsed = time.perf_counter() - t0
        all_stats = proc.gather_object(stats)
        proc.barrier()
        if not proc.is_main:
            return {}
        writer = self.open_writer(self.cfg.out)
        finished = self.finish(writer, elapsed)
        return self.summary(writer, finished, all_stats, elapsed, planned)

    def base_summary(self, n_shards: int, units_this_run: int, elapsed: float) -> dict:
        """What every encode run reports: the store, its shards and how many were already there, time, size."""
        return {
            "store": self.cfg.out,
            "shards": n_shards,
            "shards_done_before": n_shards - units_this_run,
            "seconds": round(elapsed, 2),
            "world_size": self.proc.world_size,
            "bytes": dir_size(self.cfg.out),
        }


def rate(n: float, elapsed: float) -> float:
    return n / elapsed if elapsed > 0 else 0.0


def retries_note() -> str:
    """``", 3 storage retries"`` for a progress bar, once the object store has needed any."""
    return f", {STATS.retries} storage retries" if STATS.retries else ""
