"""The text cache: every caption's hidden states at the selected LLM layers, ragged, token-major.

Layout of ``NAME.text.zarr/``::

    zarr.json                 group attributes under "semroute": kind, format_version, fingerprint,
                              layers, hidden size, storage mode, counts, "complete"
    features/                 [total_tokens, n_layers, D]  token-major, ragged, no padding stored
                              (bf16 is stored as its uint16 bit pattern: Zarr v3 has no bfloat16)
    scales/                   [total_tokens, n_layers] float32, fp8 storage only
    offsets/                  [n_captions + 1] int64, CSR: caption i is rows offsets[i]:offsets[i+1]
    lengths/                  [n_captions] int64, appended caches only (format version 2)
    null_features/ (+ null_scales/)   the null caption (instruction alone)
    progress/<array>/         one uint8 flag per shard, set only after the shard is fully written
    progress/storage_error/   per-shard [sum sq. error, sum sq. value, max abs error] (bf16/fp8 storage)
    index.parquet             one row per caption: caption, sample_id, line, text, sha256,
                              start, n_tokens, n_tokens_full, truncated

The sharded arrays, done flags, attributes and seal are the generic ones of ``shared/store.py``; this
module holds what is particular to text: the storage codecs (``TextStorage``), the writer/reader pair
(``TextCacheWriter``, ``TextCacheReader``), ``pad_batch`` and ``info``'s description.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from semroute.shared import integrity
from semroute.shared.dtypes import cache_dtype, dtype_name, parse_dtype
from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.store import (  # the generic sharded arrays, attributes and seal
    APPENDED_VERSION, ATTR_KEY, DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, FORMAT_VERSION, READ_VERSIONS,
    DoneFlags, ShardedArrayFile, ShardFileWriter, ShardLayout, check_replaceable, create_plain_array,
    create_sharded_array, describe_header, dir_size, join, open_flags, open_for_writing, open_group, read_cache_attrs,
    read_index, read_parquet, seal, shards_present, update_attrs, write_parquet,
)

TEXT_KIND = "semroute.text-cache"

# ---------------------------------------------------------------------------------------------
# Text cache: storage codecs
# ---------------------------------------------------------------------------------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class TextStorage:
    """How features of the compute dtype become stored arrays, and back.

    ``exact``: the model's own bits (bf16 as uint16 bit patterns, fp16/fp32 natively), lossless.
    ``bf16``: rounded to bfloat16 (2 bytes per value); for an fp32 compute dtype, e.g. on CPUs where
    bf16 matmuls are slow. Same as ``exact`` when the compute dtype is bf16.
    ``fp8``: float8 e4m3 with one float32 scale per token and layer (absmax / 448), about 1 byte per
    value. The lossy modes are opt-in; their error against exact is measured on every value while
    encoding and shown by ``info``.
    """

    MODES = ("exact", "bf16", "fp8")

    def __init__(self, mode: str, compute_dtype: torch.dtype):
        if mode not in self.MODES:
            raise SemrouteError(f"--storage {mode!r} is not supported; use exact, bf16 or fp8")
        if mode == "bf16" and compute_dtype == torch.bfloat16:
            mode = "exact"  # nothing to round
        self.mode = mode
        self.compute_dtype = compute_dtype

    @classmethod
    def of_cache(cls, location, attrs: dict) -> "TextStorage":
        """The storage of the text cache at ``location``, from its attributes."""
        compute = cache_dtype(attrs["fingerprint"]["compute_dtype"], location, "fingerprint.compute_dtype")
        return cls(attrs["storage"], compute)

    @property
    def lossy(self) -> bool:
        return self.mode != "exact"

    @property
    def stored_torch_dtype(self) -> torch.dtype:
        return {"exact": self.compute_dtype, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[self.mode]

    @property
    def read_dtype(self) -> torch.dtype:
        """What a reader returns by default: the stored precision, widened only where needed (fp8)."""
        return self.compute_dtype if self.mode == "fp8" else self.stored_torch_dtype

    @property
    def feature_dtype(self) -> np.dtype:
        return {torch.bfloat16: np.dtype("uint16"), torch.float16: np.dtype("float16"),
                torch.float32: np.dtype("float32"), torch.float8_e4m3fn: np.dtype("uint8")}[self.stored_torch_dtype]

    @property
    def stored_dtype_name(self) -> str:
        return dtype_name(self.stored_torch_dtype)

    def row_bytes(self, n_layers: int, hidden: int) -> dict[str, int]:
        out = {"features": n_layers * hidden * self.feature_dtype.itemsize}
        if self.mode == "fp8":
            out["scales"] = n_layers * 4
        return out

    def encode(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``x``: ``[T, L, D]`` in the compute dtype -> arrays to store, and for the lossy modes the error
        stats ``[sum squared error, sum squared value, max abs error]``."""
        if not torch.isfinite(x).all():
            raise SemrouteError("the LLM produced non-finite hidden states (inf/NaN); with --dtype float16 "
                                "this is an overflow: use bfloat16 or float32")
        x = x.to(self.compute_dtype).contiguous().cpu()
        if self.mode == "exact":
            return {"features": _bits(x)}, None
        xf = x.float()
        if self.mode == "bf16":
            q = x.to(torch.bfloat16)
            arrays, approx = {"features": _bits(q)}, q.float()
        else:
            amax = xf.abs().amax(dim=-1)  # [T, L]
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            arrays, approx = {"features": q.view(torch.uint8).numpy(), "scales": scale.numpy()}, q.float() * scale[..., None]
        err = approx - xf
        stats = np.array([float((err**2).sum()), float((xf**2).sum()), float(err.abs().max()) if err.numel() else 0.0])
        return arrays, stats

    def decode(self, features: np.ndarray, scales: np.ndarray | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t, s = self.bits(features, scales)
        return self.decode_bits(t, s, out_dtype)

    @staticmethod
    def bits(features: np.ndarray, scales: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored arrays as tensors of the same bytes: bf16 bit patterns viewed as bfloat16 (free), fp8 kept
        as uint8 codes beside its float32 scales. What a loader moves to the GPU before ``decode_bits``."""
        t = torch.from_numpy(np.ascontiguousarray(features))
        if t.dtype == torch.uint16:
            t = t.view(torch.bfloat16)
        return t, (torch.from_numpy(np.ascontiguousarray(scales)) if scales is not None else None)

    def decode_bits(self, features: torch.Tensor, scales: torch.Tensor | None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``bits``' tensors (on any device) -> features in ``out_dtype``: a cast, or for fp8 codes x scale."""
        out_dtype = out_dtype or self.read_dtype
        if self.mode != "fp8":
            return features.to(out_dtype)
        return (features.view(torch.float8_e4m3fn).float() * scales[..., None]).to(out_dtype)

    def roundtrip(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` as a reader of this storage would return it: what the sampler feeds the DiT, so prompts
        at sampling time carry exactly the precision the training captions had."""
        arrays, _ = self.encode(x)
        return self.decode(arrays["features"], arrays.get("scales"), out_dtype)


def _bits(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array to store (bf16 as its uint16 bit pattern: Zarr v3 has no bf16)."""
    return x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


# ---------------------------------------------------------------------------------------------
# Text cache writer
# ---------------------------------------------------------------------------------------------
class TextCacheWriter:
    """Creates a text cache and writes it whole shard by whole shard.

    Typical use (one process; several processes each call ``open`` and write their own shards)::

        writer = TextCacheWriter.create(url, offsets=..., index=..., ...)   # before any forward pass
        for shard in writer.pending(writer.layout.split(rank, world)):
            writer.write_shard(shard, features_of_rows)                     # [rows, L, D]
        writer.write_null(null_features)
        writer.finish()                                                     # checks every flag
    """

    def __init__(self, location, group, attrs: dict):
        self.location = location
        self.group = group
        self.attrs = attrs
        self.layout = ShardLayout(**attrs["layout"])
        self.storage = TextStorage.of_cache(location, attrs)
        self.flags = open_flags(location, group, self.array_names)
        self._files: dict[str, ShardFileWriter] = {}

    @property
    def array_names(self) -> list[str]:
        return ["features", "scales"] if self.attrs["storage"] == "fp8" else ["features"]

    @classmethod
    def create(cls, location, *, offsets: np.ndarray, index, fingerprint: dict, n_layers: int, hidden_size: int,
               storage: str = "exact", shard_bytes: int = DEFAULT_SHARD_BYTES,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, input_sha256: str, extra: dict | None = None
               ) -> "TextCacheWriter":
        """Create the store: arrays, offsets, index.parquet and attributes (``complete`` = False)."""
        codec = TextStorage(storage, parse_dtype(fingerprint["compute_dtype"]))
        total = int(offsets[-1])
        row_bytes = codec.row_bytes(n_layers, hidden_size)
        layout = ShardLayout.plan(total, row_bytes["features"], shard_bytes, chunk_bytes)
        check_replaceable(location, TEXT_KIND)
        group = open_group(location, mode="w")
        create_sharded_array(group, "features", (total, n_layers, hidden_size), codec.feature_dtype, layout)
        if storage == "fp8":
            create_sharded_array(group, "scales", (total, n_layers), np.float32, layout)
        if codec.lossy:
            from zarr.codecs import Crc32cCodec

            group.create_array("progress/storage_error", shape=(layout.n_shards, 3), dtype="float64", chunks=(1, 3),
                               fill_value=0.0, compressors=[Crc32cCodec()], overwrite=True)
        create_plain_array(group, "offsets", np.asarray(offsets, dtype=np.int64))
        attrs = {
            "kind": TEXT_KIND,
            "format_version": FORMAT_VERSION,
            "fingerprint": {**fingerprint, "storage": storage, "stored_dtype": codec.stored_dtype_name},
            "layers": list(fingerprint["layers"]),
            "hidden_size": hidden_size,
            "storage": storage,
            "n_captions": len(offsets) - 1,
            "total_tokens": total,
            "layout": {"rows": layout.rows, "rows_per_shard": layout.rows_per_shard,
                       "rows_per_chunk": layout.rows_per_chunk},
            "input_sha256": input_sha256,
            "complete": False,
            **(extra or {}),
        }
        group.attrs.update({ATTR_KEY: attrs})
        for name in (["features", "scales"] if storage == "fp8" else ["features"]):
            DoneFlags(group, name, layout.n_shards)
        write_parquet(location, integrity.INDEX, index)
        return cls(location, group, attrs)

    @classmethod
    def open(cls, location) -> "TextCacheWriter":
        group, attrs = open_for_writing(location, TEXT_KIND, "text cache", versions=READ_VERSIONS)
        return cls(location, group, attrs)

    def lengths(self, offsets: np.ndarray | None = None) -> np.ndarray:
        """Tokens per caption (the stored ``lengths`` of an appended cache, else ``diff(offsets)``)."""
        if "lengths" in self.group:
            return np.asarray(self.group["lengths"][:], dtype=np.int64)
        return np.diff(np.asarray(self.group["offsets"][:], dtype=np.int64) if offsets is None else offsets)

    def append(self, *, offsets: np.ndarray, index, input_sha256: str, source: str, extra: dict | None = None) -> None:
        """Grow a finished cache by new captions (``offsets``: their CSR offsets from 0; ``index``: their rows
        of index.parquet, numbered from 0). Their rows start at the next shard boundary: existing shard files
        are never rewritten; arrays are resized (metadata only), the done flags extended with zeros, offsets,
        lengths and the index rewritten whole. The cache is marked incomplete first, so no reader uses it
        half-grown; encoding the new shards and ``finish()`` complete it. Safe to run again after a crash
        at any point (it starts over from the ``appending`` marker and the old captions' rows of the index)."""
        import pyarrow as pa

        attrs = self.attrs
        segments = list(attrs.get("segments") or [{"source": attrs.get("source"), "first_caption": 0,
                                                    "n_captions": attrs["n_captions"], "start_row": 0,
                                                    "input_sha256": attrs["input_sha256"]}])
        pending_seg = attrs.get("appending")
        if pending_seg is not None:
            segments = pending_seg["segments_before"]
        n_before = sum(s["n_captions"] for s in segments)
        old_index = read_parquet(self.location, integrity.INDEX).slice(0, n_before)
        all_offsets, lengths = self._rows_before(old_index, n_before, first_try=pending_seg is None)
        if pending_seg is None:
            update_attrs(self.group, complete=False, appending={"source": source, "input_sha256": input_sha256,
                                                                "segments_before": segments,
                                                                "rows_before": self.layout.rows,
                                                                "n_truncated_before": attrs.get("n_truncated", 0)})
            pending_seg = dict(self.group.attrs)[ATTR_KEY]["appending"]
        rows_before = pending_seg["rows_before"]
        old = ShardLayout(rows_before, self.layout.rows_per_shard, self.layout.rows_per_chunk)
        start = old.n_shards * old.rows_per_shard
        new_lengths = np.diff(np.asarray(offsets, dtype=np.int64))
        rows = start + int(offsets[-1])
        all_offsets = np.concatenate([all_offsets, start + np.asarray(offsets, dtype=np.int64)])
        lengths = np.concatenate([lengths, new_lengths])
        layout = ShardLayout(rows, old.rows_per_shard, old.rows_per_chunk)
        # 1. Arrays grow (zarr rewrites only their metadata), flags get zeros for the new shards.
        for name in self.array_names:
            arr = self.group[name]
            arr.resize((rows, *arr.shape[1:]))
            self.flags[name].array.resize((layout.n_shards,))
        if "progress/storage_error" in self.group:
            self.group["progress/storage_error"].resize((layout.n_shards, 3))
        # 2. Offsets, lengths and the index, whole.
        create_plain_array(self.group, "offsets", all_offsets)
        create_plain_array(self.group, "lengths", lengths)
        new_index = index.set_column(index.schema.get_field_index("caption"), "caption",
                                     pa.array(np.arange(n_before, n_before + index.num_rows, dtype=np.int64)))
        new_index = new_index.set_column(new_index.schema.get_field_index("start"), "start",
                                         pa.array(all_offsets[n_before:-1]))
        write_parquet(self.location, integrity.INDEX, pa.concat_tables([old_index, new_index.select(
            old_index.column_names)]))
        # 3. Attributes last: the new layout and counts, still incomplete until the new shards are written.
        segments = segments + [{"source": source, "first_caption": n_before, "n_captions": index.num_rows,
                                "start_row": start, "input_sha256": input_sha256}]
        extra = dict(extra or {})
        n_truncated = int(pending_seg.get("n_truncated_before") or 0)
        n_bad = int(attrs.get("n_bad_records") or 0)  # changed only below, with the rest of the attributes
        update_attrs(self.group, format_version=APPENDED_VERSION, n_captions=n_before + index.num_rows,
                     total_tokens=int(lengths.sum()), layout={"rows": layout.rows,
                                                              "rows_per_shard": layout.rows_per_shard,
                                                              "rows_per_chunk": layout.rows_per_chunk},
                     segments=segments, input_sha256=input_sha256, appending=None, complete=False,
                     n_truncated=n_truncated + int(extra.pop("n_truncated", 0)),
                     n_bad_records=n_bad + int(extra.pop("n_bad_records", 0)), **extra)
        self.attrs = dict(self.group.attrs)[ATTR_KEY]
        self.layout = layout

    def _rows_before(self, old_index, n_before: int, first_try: bool) -> tuple[np.ndarray, np.ndarray]:
        """First row and token count of each of the ``n_before`` captions the cache had before this append,
        from their rows of index.parquet (``start``, ``n_tokens``), which ``append`` replaces only after the
        offsets and lengths arrays: a run killed while it rewrote those (``create_plain_array`` replaces an
        array in place) leaves them half-written, and the rerun must not read them back. On the first try
        the arrays are still whole and must agree with the index."""
        if old_index.num_rows != n_before:
            raise CacheDamaged(f"{self.location}/index.parquet has {old_index.num_rows} rows, the cache "
                               f"{n_before} captions; {integrity.verify_hint(self.location)}")
        starts = old_index.column("start").to_numpy().astype(np.int64)
        lengths = old_index.column("n_tokens").to_numpy().astype(np.int64)
        if first_try:
            stored = np.asarray(self.group["offsets"][:], dtype=np.int64)
            if not (np.array_equal(stored[:n_before], starts) and np.array_equal(self.lengths()[:n_before], lengths)):
                raise CacheDamaged(f"{self.location}/index.parquet does not match the cache's offsets and lengths "
                                   f"arrays; {integrity.verify_hint(self.location)}")
        return starts, lengths

    def pending(self, shards) -> list[int]:
        done = np.ones(self.layout.n_shards, dtype=bool)
        for name, flags in self.flags.items():
            done &= flags.done()
            present = np.zeros_like(done)
            present[[s for s in shards_present(self.location, name) if s < len(present)]] = True
            done &= present
        return [s for s in shards if not done[s]]

    def write_shard(self, shard: int, rows: torch.Tensor) -> None:
        """Write shard ``shard`` whole from ``rows``: ``[rows_in_shard, L, D]`` in the compute dtype."""
        a, b = self.layout.shard_rows(shard)
        if rows.shape[0] != b - a:
            raise ValueError(f"shard {shard} has {b - a} rows, got {rows.shape[0]}")
        arrays, stats = self.storage.encode(rows)
        for name, data in arrays.items():
            # The shard file assembled in numpy (zarr's per-chunk pipeline holds the GIL), written or uploaded whole.
            if name not in self._files:
                self._files[name] = ShardFileWriter(self.location, name)
            self._files[name].write(shard, data)
        if stats is not None:
            self.group["progress/storage_error"][shard] = stats
        # Flags last: a shard only counts once every one of its arrays is on disk.
        for name in arrays:
            self.flags[name].set(shard)

    @property
    def has_null(self) -> bool:
        """Whether the null caption was written whole: ``write_null`` records its attributes only after its
        arrays, so a run killed while writing them (an array present but zeros) leaves this false."""
        return self.attrs.get("null_n_tokens") is not None and all(f"null_{n}" in self.group for n in self.array_names)

    def write_null(self, features: torch.Tensor, text: str) -> None:
        arrays, _ = self.storage.encode(features)
        update_attrs(self.group, null_text=None, null_n_tokens=None)  # until every array below is written
        for name, data in arrays.items():
            create_plain_array(self.group, f"null_{name}", data)
        update_attrs(self.group, null_text=text, null_n_tokens=int(features.shape[0]))
        self.attrs = dict(self.group.attrs)[ATTR_KEY]

    def finish(self, **summary) -> None:
        missing = self.pending(range(self.layout.n_shards))
        if missing:
            raise SemrouteError(f"{len(missing)} shards of {self.location} are not written yet "
                                f"(first: {missing[:5]}); run again with --resume")
        if not self.has_null:
            raise SemrouteError(f"{self.location} has no null caption yet; run again with --resume")
        update_attrs(self.group, complete=True, **summary)
        self.attrs = seal(self.group, self.location, TEXT_SMALL_ARRAYS)


TEXT_SMALL_ARRAYS = ["offsets", "lengths", "null_features", "null_scales"]  # read whole; sealed by sha256
BAD_RECORDS_FILE = "bad_records.jsonl"  # the manifest records left out (``--skip-bad``), local caches only
# The entries of a text cache's folder besides the generic ones (shared/store.py _store_entries).
TEXT_ENTRIES = {"features", "scales", *TEXT_SMALL_ARRAYS, BAD_RECORDS_FILE}


def text_array_geometry(attrs: dict, location) -> dict[str, tuple]:
    """What each sharded array of the text cache at ``location`` must be, from its attributes:
    ``name -> (shape, dtype, layout)`` (``ShardedArrayMeta.check_geometry``)."""
    layout = ShardLayout(**attrs["layout"])
    storage = TextStorage.of_cache(location, attrs)
    n_layers, hidden = len(attrs["layers"]), int(attrs["hidden_size"])
    out = {"features": ((layout.rows, n_layers, hidden), storage.feature_dtype, layout)}
    if attrs["storage"] == "fp8":
        out["scales"] = ((layout.rows, n_layers), np.float32, layout)
    return out


# ---------------------------------------------------------------------------------------------
# Text cache reader
# ---------------------------------------------------------------------------------------------
class TextCacheReader:
    """Random access to a finished text cache.

    ``caption(i)`` -> ``[n_tokens, n_layers, D]``; ``batch(indices)`` -> right-padded
    ``[B, T, n_layers, D]`` features and a ``[B, T]`` bool mask. ``layers`` selects a subset of the stored
    layers (hidden_states indices); asking for a layer the cache lacks is an error naming it.
    Safe to pickle into DataLoader workers: each process reopens the files itself.
    """

    def __init__(self, location, *, layers: list[int] | None = None, out_dtype: torch.dtype | None = None,
                 allow_incomplete: bool = False, shard_cache=None):
        self.location = str(location)
        self.shard_cache = shard_cache  # shared.remote.ShardCache for caches on object storage
        self.attrs = read_cache_attrs(location, TEXT_KIND, "text cache", "encode-text", allow_incomplete)
        self.stored_layers: list[int] = list(self.attrs["layers"])
        if layers is None:
            layers = self.stored_layers
        missing = [i for i in layers if i not in self.stored_layers]
        if missing:
            raise SemrouteError(f"{location} stores layers {self.stored_layers} but {missing} were asked for; "
                                "re-encode with --layers covering them")
        self.layers = list(layers)
        self._pick = None if self.layers == self.stored_layers else [self.stored_layers.index(i) for i in self.layers]
        self.storage = TextStorage.of_cache(self.location, self.attrs)
        self.out_dtype = out_dtype or self.storage.read_dtype
        self.hidden_size = int(self.attrs["hidden_size"])
        self.n_captions = int(self.attrs["n_captions"])
        self._offsets: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        self._files: dict[str, object] | None = None
        self._index = None

    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            offsets = integrity.read_small_array(self.location, open_group(self.location), "offsets", self.attrs)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per caption: the stored ``lengths`` (appended caches, format 2), else ``diff(offsets)``."""
        if self._lengths is None:
            group = open_group(self.location)
            self._lengths = (np.asarray(integrity.read_small_array(self.location, group, "lengths", self.attrs),
                                        dtype=np.int64) if "lengths" in group else np.diff(self.offsets))
        return self._lengths

    @property
    def index(self):
        """The caption index as a pyarrow Table (caption, sample_id, text, n_tokens, truncated, ...)."""
        if self._index is None:
            self._index = read_index(self.location, self.attrs)
        return self._index

    def __len__(self) -> int:
        return self.n_captions

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = None
        state["_index"] = None
        return state

    def _arrays(self) -> dict:
        if self._files is None:
            names = ["features", "scales"] if self.attrs["storage"] == "fp8" else ["features"]
            # Local files or remote objects alike: our reader, ranged reads of the inner chunks needed.
            files = {n: ShardedArrayFile(self.location, n, shard_cache=self.shard_cache) for n in names}
            for name, expect in text_array_geometry(self.attrs, self.location).items():
                files[name].meta.check_geometry(*expect)
            self._files = files
        return self._files

    def _bits(self, features: np.ndarray, scales: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pick is not None:
            features = features[:, self._pick]
            scales = scales[:, self._pick] if scales is not None else None
        return self.storage.bits(features, scales)

    def decode_bits(self, features: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """What ``caption_bits`` returned (moved anywhere, e.g. to the GPU) -> ``caption``'s features."""
        return self.storage.decode_bits(features, scales, self.out_dtype)

    def caption_bits(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption ``i`` as stored: ``[n_tokens, n_layers, D]`` bits and, for fp8, ``[n_tokens, n_layers]``
        scales; ``decode_bits`` of them is ``caption(i)``."""
        return self.captions_bits([i])[0]

    def bits_row(self) -> tuple[tuple[int, ...], torch.dtype]:
        """One token's shape ``(n_layers, D)`` and the dtype of ``captions_bits``' feature tensors."""
        features = self._arrays()["features"]
        empty = np.empty((0, len(self.layers), *features.row_shape[1:]), dtype=features.dtype)
        return tuple(empty.shape[1:]), self.storage.bits(empty, None)[0].dtype

    def captions_bits(self, indices, into: list[torch.Tensor] | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``caption_bits`` of every caption in ``indices``, their rows read together: on object storage one
        round of concurrent ranged requests for the whole list (``ShardedArrayFile.read_many``).

        ``into``: a contiguous ``[n_tokens, *bits_row()]`` tensor per caption (a loader's reused host buffer) to
        read the features into, saving a copy; the features returned are then those tensors. Ignored when
        reading a subset of the stored layers (the rows are read whole, then the layers picked)."""
        spans = []
        for i in indices:
            i = int(i)
            if not 0 <= i < self.n_captions:
                raise IndexError(f"caption {i} out of range 0..{self.n_captions - 1}")
            start = int(self.offsets[i])
            spans.append((start, start + int(self.lengths[i])))
        files = self._arrays()
        outs = None
        if into is not None and self._pick is None:
            # The tensors' bytes as arrays of the stored dtype (uint16 for bf16 bits): views, no copy.
            dtype = files["features"].dtype
            outs = [t.view(torch.uint8).numpy().view(dtype).reshape(t.shape) for t in into]
        arrays = [files["features"].read_many(spans, outs)]
        if "scales" in files:
            arrays.append(files["scales"].read_many(spans))
        return [self._bits(arrays[0][k], arrays[1][k] if len(arrays) > 1 else None) for k in range(len(spans))]

    def shard_of(self, captions) -> np.ndarray:
        """The shard of ``features`` where each caption's rows start."""
        rows = self.offsets[np.asarray(captions, dtype=np.int64)]
        return rows // self._arrays()["features"].rows_per_shard

    def caption(self, i: int) -> torch.Tensor:
        """Caption ``i``'s features ``[n_tokens, n_layers, D]``."""
        return self.decode_bits(*self.caption_bits(i))

    def null_bits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        group = open_group(self.location)
        read = integrity.read_small_array
        scales = read(self.location, group, "null_scales", self.attrs) if self.attrs["storage"] == "fp8" else None
        return self._bits(read(self.location, group, "null_features", self.attrs), scales)

    def null(self) -> torch.Tensor:
        """The null caption's features ``[n_tokens, n_layers, D]``."""
        return self.decode_bits(*self.null_bits())

    def batch(self, indices, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions ``indices`` right-padded (zeros) to the longest: ``[B, T, L, D]`` and mask ``[B, T]``."""
        return pad_batch([self.decode_bits(*bits) for bits in self.captions_bits(indices)], pad_to=pad_to)


def pad_batch(items: list[torch.Tensor], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[n_i, ...]`` tensors with zeros to ``[B, T, ...]`` plus a ``[B, T]`` bool mask."""
    t_max = max(x.shape[0] for x in items)
    if pad_to is not None:
        t_max = max(t_max, pad_to)
    first = items[0]
    out = first.new_zeros((len(items), t_max, *first.shape[1:]))
    mask = torch.zeros((len(items), t_max), dtype=torch.bool)
    for row, x in enumerate(items):
        out[row, : x.shape[0]] = x
        mask[row, : x.shape[0]] = True
    return out, mask


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def describe_text_cache(path: str, attrs: dict) -> dict:
    fp = attrs["fingerprint"]
    total = attrs["total_tokens"]
    L = len(attrs["layers"])
    D = attrs["hidden_size"]
    group = open_group(path)
    size = dir_size(path)
    data_bytes = sum(dir_size(join(path, n)) for n in ("features", "scales") if n == "features" or attrs["storage"] == "fp8")
    info = {
        **describe_header("text cache", path, attrs, ["features"]),
        "captions": attrs["n_captions"],
        "tokens": total,
        "mean tokens per caption": round(total / max(1, attrs["n_captions"]), 2),
        "truncated captions": attrs.get("n_truncated"),
        "layers": f"{L}: {attrs['layers']}",
        "hidden size": D,
        "storage": f"{attrs['storage']} ({fp['stored_dtype']})",
        "size on disk": f"{size / 2**20:.2f} MiB",
        "bytes per token-layer value": round(data_bytes / max(1, total * L * D), 4) if data_bytes else None,
        "null caption": f"{attrs.get('null_text')!r} ({attrs.get('null_n_tokens')} tokens)",
        "fingerprint": {k: v for k, v in fp.items() if k != "layers"},
    }
    if "progress/storage_error" in group:
        err = np.asarray(group["progress/storage_error"][:])
        sq_err, sq_val = float(err[:, 0].sum()), float(err[:, 1].sum())
        info["storage error vs exact"] = {
            "relative RMS": f"{math.sqrt(sq_err / max(sq_val, 1e-30)):.3e}",
            "max abs": f"{float(err[:, 2].max()):.3e}",
            "measured on": f"{int((err[:, 1] > 0).sum())} shards, every value",
        }
    return info
