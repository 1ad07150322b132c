"""``encode-text``: run the frozen LLM once over every caption and write the ragged text cache.

The run, in order:
  1. Tokenize every caption (cheap next to a forward pass). Lengths give the offsets, hence the shard
     plan and the exact store size, before the first forward pass (``--estimate`` stops here).
  2. Create the store (or reopen it with ``--resume``, refusing a different model, prompt format or
     manifest). Encode the null caption.
  3. Each process takes a contiguous range of shards. Per shard: captions sorted by length into
     batches under a padded-token budget, forward passes, rows copied into a shard buffer, the buffer
     handed to a writer thread so disk writes overlap the next forward passes.
  4. Once every shard's flag is set, the store is marked complete.

A caption that crosses a shard boundary is encoded alone (a batch of one, no padding). Which
captions are batched together is thus a function of the shard alone, so any split of shards over
processes, and any resume point, writes the same bits as one uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from semroute.shared.checks import check_number
from semroute.shared.distributed import ProcessInfo
from semroute.shared.dtypes import dtype_name
from semroute.shared.errors import SemrouteError
from semroute.shared.fingerprint import sha256_text
from semroute.shared.integrity import INDEX
from semroute.shared.layers import parse_layers
from semroute.shared.llm import LoadedLLM, load_llm
from semroute.shared.manifest import Problem, check_unicode, read_problem_report, write_problem_report
from semroute.shared.remote import is_url
from semroute.shared.sources import read_source
from semroute.shared.store import DEFAULT_CHUNK_BYTES, ShardLayout, read_parquet, store_file
from semroute.shared.text_encoder import DEFAULT_INSTRUCTION, PromptFormat, TextEncoder
from semroute.shared.text_store import BAD_RECORDS_FILE, TEXT_KIND, TextCacheWriter, TextStorage
from semroute.stage1_encode.encode_run import (EncodeRun, ShardSizes, ShardWriterThread, decide, rate,
                                                refuse_known_ids, retries_note)

log = logging.getLogger(__name__)


@dataclass
class EncodeTextConfig(ShardSizes):
    data: str
    out: str
    llm: str = "smollm2"
    layers: str = "all"
    max_length: int = 512
    instruction: str = DEFAULT_INSTRUCTION
    chat_template: bool = False
    storage: str = "exact"
    dtype: str = "bfloat16"
    device: str = "auto"
    batch_tokens: int = 8192  # padded tokens per forward pass (batch size x longest caption)
    max_batch: int = 256
    shard_mb: float = 128.0
    chunk_kb: float = DEFAULT_CHUNK_BYTES / 1024
    text_key: str = "text"
    id_key: str = "id"
    input_format: str = "auto"  # manifest | folder | parquet | csv | webdataset (shared/sources.py)
    storage_options: dict | None = None  # fsspec options for URLs (endpoint, credentials)
    skip_bad: bool = False
    resume: bool = False
    append: bool = False  # add the captions of `data` to the existing cache `out` (new shards only)
    overwrite: bool = False
    estimate: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
@dataclass
class CaptionPlan:
    offsets: np.ndarray  # [n_captions + 1] int64
    index: object  # pyarrow Table, one row per caption
    n_truncated: int
    input_sha256: str
    problems: list = field(default_factory=list)
    id_source: dict = field(default_factory=dict)  # Manifest.id_source(): positional ids and the file's sha256


def build_plan(cfg: EncodeTextConfig, encoder: TextEncoder, progress: bool = True) -> CaptionPlan:
    import pyarrow as pa
    from tqdm.auto import tqdm

    manifest = read_source(cfg.data, kind=cfg.input_format, text_key=cfg.text_key, id_key=cfg.id_key,
                           need_text=True, skip_bad=cfg.skip_bad, storage_options=cfg.storage_options)
    sample_ids, lines, texts = [], [], []
    for rec in manifest.records:
        for text in rec.texts:
            sample_ids.append(rec.sample_id)
            lines.append(rec.line)
            texts.append(text)
    n = len(texts)
    lengths = np.empty(n, dtype=np.int64)
    full = np.empty(n, dtype=np.int64)
    step = 2048
    with tqdm(total=n, desc="tokenizing", unit="cap", disable=not progress, leave=False) as bar:
        for i in range(0, n, step):
            for j, tok in enumerate(encoder.tokenize(texts[i:i + step])):
                lengths[i + j] = len(tok.ids)
                full[i + j] = tok.n_full
            bar.update(min(step, n - i))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    shas = [sha256_text(t) for t in texts]
    truncated = full > lengths
    index = pa.table({
        "caption": pa.array(np.arange(n, dtype=np.int64)),
        "sample_id": pa.array(sample_ids, pa.string()),
        "line": pa.array(lines, pa.int64()),
        "text": pa.array(texts, pa.string()),
        "sha256": pa.array(shas, pa.string()),
        "start": pa.array(offsets[:-1]),
        "n_tokens": pa.array(lengths.astype(np.int32)),
        "n_tokens_full": pa.array(full.astype(np.int32)),
        "truncated": pa.array(truncated),
    })
    input_sha = sha256_text("\n".join(f"{s}\t{h}\t{k}" for s, h, k in zip(sample_ids, shas, lengths.tolist())))
    return CaptionPlan(offsets, index, int(truncated.sum()), input_sha, manifest.problems, manifest.id_source())


def plan_batches(captions: np.ndarray, lengths: np.ndarray, batch_tokens: int, max_batch: int,
                 min_efficiency: float = 0.95) -> list[list[int]]:
    """Group captions into batches of similar length.

    Captions are sorted by length; a batch is closed when adding the next caption would exceed
    ``batch_tokens`` padded tokens (count x longest) or ``max_batch`` captions, or would drop the
    batch's share of real tokens below ``min_efficiency``. Deterministic in its inputs.
    """
    order = sorted(captions.tolist(), key=lambda c: (int(lengths[c]), c))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for c in order:
        n = int(lengths[c])  # ascending, so the newcomer is the longest
        if current and (
            (len(current) + 1) * n > batch_tokens
            or len(current) >= max_batch
            or (real + n) < min_efficiency * (len(current) + 1) * n
        ):
            batches.append(current)
            current, real = [], 0
        current.append(c)
        real += n
    if current:
        batches.append(current)
    return batches


@dataclass
class ShardWork:
    shard: int
    rows: tuple[int, int]
    batches: list[list[int]]  # captions that start and end inside this shard
    alone: list[int]  # captions crossing a boundary of this shard, encoded one at a time


def shard_work(shard: int, layout: ShardLayout, offsets: np.ndarray, cfg: EncodeTextConfig,
               lengths: np.ndarray | None = None) -> ShardWork:
    """``lengths``: tokens per caption where rows between captions are unused (an appended cache, whose new
    captions start at a shard boundary); default: ``diff(offsets)``."""
    a, b = layout.shard_rows(shard)
    starts = offsets[:-1]
    lengths = np.diff(offsets) if lengths is None else lengths
    ends = starts + lengths
    first = int(np.searchsorted(ends, a, side="right"))  # first caption that ends after row a
    last = int(np.searchsorted(starts, b, side="left"))  # captions [first, last) touch [a, b)
    touching = np.arange(first, last)
    crossing = (starts[touching] < a) | (ends[touching] > b)
    inside = touching[~crossing]
    batches = plan_batches(inside, lengths, cfg.batch_tokens, cfg.max_batch)
    return ShardWork(shard, (a, b), batches, touching[crossing].tolist())


def padding_efficiency(layout: ShardLayout, offsets: np.ndarray, cfg: EncodeTextConfig) -> float:
    lengths = np.diff(offsets)
    real = padded = 0
    for s in range(layout.n_shards):
        work = shard_work(s, layout, offsets, cfg)
        for batch in work.batches:
            real += int(lengths[batch].sum())
            padded += len(batch) * int(lengths[batch].max())
        for c in work.alone:
            real += int(lengths[c])
            padded += int(lengths[c])
    return real / max(padded, 1)


class IndexTexts:
    """Caption texts by index range, read from ``index.parquet`` one row group at a time, so a
    process never holds every caption of a large dataset in memory."""

    def __init__(self, location: str):
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(store_file(location, INDEX))
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cache: tuple[int, list[str]] | None = None

    def get(self, captions: list[int]) -> list[str]:
        out = []
        for c in captions:
            group = int(np.searchsorted(self._starts, c, side="right") - 1)
            if self._cache is None or self._cache[0] != group:
                self._cache = (group, self._file.read_row_group(group, columns=["text"]).column(0).to_pylist())
            out.append(self._cache[1][c - int(self._starts[group])])
        return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def estimate_text(plan: CaptionPlan, encoder: TextEncoder, cfg: EncodeTextConfig) -> dict:
    """Exact sizes of the arrays the run will write, known from token counts alone."""
    L, D = len(encoder.layers), encoder.llm.hidden_size
    storage = TextStorage(cfg.storage, encoder.llm.dtype)
    row_bytes = storage.row_bytes(L, D)
    total = int(plan.offsets[-1])
    layout = ShardLayout.plan(total, row_bytes["features"], cfg.shard_bytes, cfg.chunk_bytes)
    arrays = {name: layout.nbytes(rb) for name, rb in row_bytes.items()}
    payload = sum(arrays.values())
    return {
        "captions": len(plan.offsets) - 1,
        "tokens": total,
        "truncated": plan.n_truncated,
        "layers": encoder.layers,
        "hidden_size": D,
        "storage": cfg.storage,
        "shards": layout.n_shards,
        "tokens_per_shard": layout.rows_per_shard,
        "array_bytes": arrays,
        "bytes_total_arrays": payload,
        "bytes_per_token_layer_value": payload / max(1, total * L * D),
        "padding_efficiency": padding_efficiency(layout, plan.offsets, cfg),
    }


def encode_text(cfg: EncodeTextConfig, *, proc: ProcessInfo | None = None, llm: LoadedLLM | None = None) -> dict:
    """Run ``encode-text``; returns a summary dict (also printed by the CLI).

    ``llm`` may be passed already loaded (tests, notebooks); otherwise ``cfg.llm`` is loaded.
    """
    return EncodeTextRun(cfg, proc, llm).run()


class EncodeTextRun(EncodeRun):
    """``encode-text`` filled into the encode-run skeleton (``encode_run.EncodeRun``)."""

    open_writer = staticmethod(TextCacheWriter.open)

    def __init__(self, cfg: EncodeTextConfig, proc: ProcessInfo | None = None, llm: LoadedLLM | None = None):
        super().__init__(cfg, proc)
        proc = self.proc
        check_number("--max-length", cfg.max_length, integer=True, low=1)
        check_number("--batch-tokens", cfg.batch_tokens, integer=True, low=1)
        check_number("--shard-mb", cfg.shard_mb, low=0.0, low_open=True)
        if cfg.storage not in TextStorage.MODES:  # (TextStorage says so too, but only once the LLM is loaded)
            raise SemrouteError(f"--storage {cfg.storage!r} is not supported; use {', '.join(TextStorage.MODES)}")
        check_unicode(cfg.instruction, "--instruction")  # bytes that are not UTF-8 in the shell's argument
        if llm is None:
            llm = load_llm(cfg.llm, device=proc.device_for(cfg.device), dtype=cfg.dtype)
        if llm.device.type == "cpu" and llm.dtype != torch.float32 and proc.is_main and not cfg.estimate:
            log.warning("encoding in %s on the CPU: CPU bf16/fp16 matmuls are often several times slower than "
                        "float32; consider --dtype float32 --storage bf16 (same bytes stored)",
                        dtype_name(llm.dtype))
        layers = parse_layers(cfg.layers, llm.num_hidden_layers)
        fmt = PromptFormat(instruction=cfg.instruction, chat_template=cfg.chat_template, max_length=cfg.max_length)
        self.encoder = TextEncoder(llm, fmt, layers)
        null = self.encoder.null_caption()
        if null.n_full >= cfg.max_length:
            # Every caption would be cut back to the instruction alone, i.e. to the null caption.
            raise SemrouteError(f"--max-length {cfg.max_length} leaves no room for captions: the instruction alone "
                                f"({cfg.instruction!r}{', in the chat template' if cfg.chat_template else ''}) is "
                                f"{null.n_full} tokens; use --max-length > {null.n_full}")

    def plan_and_create(self) -> dict:
        """Tokenize every caption, then create, reopen or grow the store (rank 0); every rank learns the outcome."""
        cfg, encoder = self.cfg, self.encoder

        def on_main() -> dict:
            plan = build_plan(cfg, encoder, progress=self.show)
            problems = [str(p) for p in plan.problems]
            if cfg.estimate:
                return {"estimate": estimate_text(plan, encoder, cfg), "problems": problems}
            _create_or_reopen(cfg, encoder, plan)
            return {"problems": problems}

        return self.proc.run_on_main(on_main)

    def my_units(self, writer: TextCacheWriter) -> list[int]:
        return list(writer.layout.split(self.proc.rank, self.proc.world_size))

    def prepare(self, writer: TextCacheWriter) -> None:
        self.offsets = np.asarray(writer.group["offsets"][:], dtype=np.int64)
        self.lengths = writer.lengths(self.offsets)

    def encode(self, writer: TextCacheWriter, units: list[int], background: ShardWriterThread) -> dict:
        return _encode_shards(writer, self.encoder, self.offsets, self.lengths, units, self.cfg, background,
                              show=self.show, rank=self.proc.rank)

    def summary(self, writer: TextCacheWriter, finished: dict, stats: list[dict], elapsed: float,
                planned: dict) -> dict:
        attrs = writer.attrs
        captions = sum(s["captions"] for s in stats)
        tokens = sum(s["tokens"] for s in stats)
        return {
            **self.base_summary(writer.layout.n_shards, sum(len(s["shards"]) for s in stats), elapsed),
            "captions": attrs["n_captions"],
            "tokens": attrs["total_tokens"],
            "truncated": attrs["n_truncated"],
            "max_length": self.cfg.max_length,
            "encoded_captions_this_run": captions,
            "encoded_tokens_this_run": tokens,
            "captions_per_s": rate(captions, elapsed),
            "tokens_per_s": rate(tokens, elapsed),
            "bad_records": attrs.get("n_bad_records", 0),
            "problems": planned["problems"],
        }


def _create_or_reopen(cfg: EncodeTextConfig, encoder: TextEncoder, plan: CaptionPlan) -> None:
    fingerprint = encoder.fingerprint()
    action = decide(cfg, TextCacheWriter.open, {**fingerprint, "storage": cfg.storage}, plan.input_sha256,
                    kind=TEXT_KIND, inputs="captions", changed="the manifest changed")
    if action == "resume":
        writer = TextCacheWriter.open(cfg.out)
    elif action == "append":  # grow the cache by plan's captions (new shards only)
        writer = TextCacheWriter.open(cfg.out)
        if writer.attrs.get("appending") is None:  # not a rerun of a grow that stopped halfway
            index = read_parquet(cfg.out, INDEX, columns=["sample_id"])
            segments = writer.attrs.get("segments") or [{"source": writer.attrs.get("source"), "first_caption": 0}]
            refuse_known_ids(cfg, index.column("sample_id").to_pylist(),
                             zip(plan.index.column("sample_id").to_pylist(), plan.index.column("line").to_pylist()),
                             segments, "first_caption", "caption")
        if plan.problems and not is_url(cfg.out):  # before the grow: a rerun finds them there and adds none twice
            _add_problem_report(plan.problems, Path(cfg.out) / BAD_RECORDS_FILE)
        writer.append(offsets=plan.offsets, index=plan.index, input_sha256=plan.input_sha256, source=str(cfg.data),
                      extra={"n_truncated": plan.n_truncated, "n_bad_records": len(plan.problems)})
    else:
        extra = {"n_truncated": plan.n_truncated, "n_bad_records": len(plan.problems), "source": str(cfg.data),
                 "sample_ids": plan.id_source}
        writer = TextCacheWriter.create(
            cfg.out, offsets=plan.offsets, index=plan.index, fingerprint=fingerprint,
            n_layers=len(encoder.layers), hidden_size=encoder.llm.hidden_size, storage=cfg.storage,
            shard_bytes=cfg.shard_bytes, chunk_bytes=cfg.chunk_bytes,
            input_sha256=plan.input_sha256, extra=extra,
        )
        if plan.problems and not is_url(cfg.out):
            write_problem_report(plan.problems, Path(cfg.out) / BAD_RECORDS_FILE)
    if not writer.has_null:  # never written, or its write was killed (the array may exist, zeros)
        null = encoder.null_caption()
        features, _ = encoder.forward([null.ids])
        writer.write_null(features[0].cpu(), text=encoder.fmt.render("", encoder.llm.tokenizer))


def _add_problem_report(problems: list[Problem], path: Path) -> None:
    """``write_problem_report`` of the records already listed in ``path`` (earlier parts of the cache) and then
    those of ``problems`` not listed yet."""
    have = read_problem_report(path)
    write_problem_report(have + [p for p in problems if p not in have], path)


def _encode_shards(writer: TextCacheWriter, encoder: TextEncoder, offsets: np.ndarray, lengths: np.ndarray,
                   shards: list[int], cfg: EncodeTextConfig, background: ShardWriterThread, *, show: bool,
                   rank: int) -> dict:
    from tqdm.auto import tqdm

    layout = writer.layout
    L, D = len(encoder.layers), encoder.llm.hidden_size
    texts = IndexTexts(cfg.out)
    total_rows = sum(b - a for a, b in (layout.shard_rows(s) for s in shards))
    bar = tqdm(total=total_rows, unit="tok", unit_scale=True, desc=f"encode-text[{rank}]", disable=not show,
               smoothing=0.05)
    carried: dict[int, torch.Tensor] = {}  # captions encoded alone, kept for the next shard
    n_captions = n_tokens = 0
    t_start = time.perf_counter()
    try:
        for shard in shards:
            work = shard_work(shard, layout, offsets, cfg, lengths)
            a, b = work.rows
            rows = torch.empty((b - a, L, D), dtype=encoder.llm.dtype)
            filled = 0

            def place(caption: int, feats: torch.Tensor) -> int:
                s = int(offsets[caption])
                e = s + int(lengths[caption])
                lo, hi = max(s, a), min(e, b)
                rows[lo - a: hi - a] = feats[lo - s: hi - s]
                return hi - lo

            for batch in work.batches:
                feats = _run(encoder, batch, texts, lengths)
                for j, c in enumerate(batch):
                    filled += place(c, feats[j])
                n_captions += len(batch)
                n_tokens += int(lengths[batch].sum())
                bar.update(int(lengths[batch].sum()))
                _postfix(bar, n_captions, n_tokens, t_start)
            for c in work.alone:
                feats = carried.pop(c, None)
                if feats is None:
                    feats = _run(encoder, [c], texts, lengths)[0]
                    n_captions += 1
                    n_tokens += int(lengths[c])
                got = place(c, feats)
                filled += got
                bar.update(got)
                if int(offsets[c]) + int(lengths[c]) > b:
                    carried[c] = feats
            if filled != b - a:
                raise RuntimeError(f"shard {shard}: filled {filled} of {b - a} rows (plan bug)")
            background.put(shard, rows)
    finally:
        bar.close()
    return {"captions": n_captions, "tokens": n_tokens, "shards": list(shards), "rank": rank}


def _run(encoder: TextEncoder, captions: list[int], texts: IndexTexts, lengths: np.ndarray) -> torch.Tensor:
    """Forward one batch; returns ``[B, T, L, D]`` on the CPU. Checks the plan's lengths and finiteness."""
    tokenized = encoder.tokenize(texts.get(captions))
    for c, tok in zip(captions, tokenized):
        if len(tok.ids) != int(lengths[c]):
            raise SemrouteError(f"caption {c} now tokenizes to {len(tok.ids)} tokens, the plan says "
                                f"{int(lengths[c])}: the tokenizer changed since the cache was created")
    feats, mask = encoder.forward([t.ids for t in tokenized])
    if not torch.isfinite(feats[mask]).all():
        bad = [c for j, c in enumerate(captions) if not torch.isfinite(feats[j][mask[j]]).all()]
        raise SemrouteError(f"the LLM produced inf/NaN hidden states for captions {bad[:10]} (an fp16 overflow "
                            "if --dtype float16: use bfloat16 or float32). Nothing was written for their shard.")
    return feats.cpu()


def _postfix(bar, n_captions: int, n_tokens: int, t_start: float) -> None:
    dt = max(time.perf_counter() - t_start, 1e-9)
    bar.set_postfix_str(f"{n_captions / dt:.1f} cap/s{retries_note()}", refresh=False)
