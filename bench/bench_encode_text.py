"""Benchmark for ``encode-text`` (issue 2), everything measured side by side in one run.

1. Throughput: a full ``encode_text`` run (tokenize, plan, forward passes, storage, background writes)
   against a bare loop of forward passes of the same model over the same captions with the same batches.
2. Padding efficiency (real / padded tokens per forward pass) and stored bytes per token-layer value
   for ``exact`` (bf16) and ``fp8``.
3. Random-access reads of batches of 64 captions: the cache reader against numpy reading the same
   bytes from a memory-mapped file (and against zarr's own slicing, for reference).
4. Peak memory (max RSS) of whole ``encode-text`` runs at two dataset sizes.

Captions: GenAI-Bench's 1600 prompts (its genai_image.json, from the workspace's data folder). Model: SmolLM2-135M-Instruct (GGUF), bf16.

    python bench/bench_encode_text.py [--captions 1600] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "genaibench" / "genai_image.json"


def prompts(n: int) -> list[str]:
    items = list(json.loads(DATA.read_text()).values())
    base = [" " + item["prompt"] for item in items]
    return [base[i % len(base)] for i in range(n)]


def write_manifest(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def bench_throughput(llm, texts, tmp: Path, batch_tokens: int, storage: str, tag: str = "") -> dict:
    from semroute.shared.dtypes import dtype_name
    from semroute.shared.layers import parse_layers
    from semroute.shared.store import ShardLayout
    from semroute.shared.text_encoder import PromptFormat, TextEncoder
    from semroute.shared.text_store import TextStorage
    from semroute.stage1_encode.text import EncodeTextConfig, build_plan, encode_text, padding_efficiency, shard_work

    manifest = write_manifest(tmp / "m.jsonl", texts)
    out = tmp / f"bench-{storage}{tag}.text.zarr"
    cfg = EncodeTextConfig(data=str(manifest), out=str(out), llm="smollm2", progress=False,
                           batch_tokens=batch_tokens, storage=storage, overwrite=True,
                           dtype=dtype_name(llm.dtype))
    encoder = TextEncoder(llm, PromptFormat(), parse_layers("all", llm.num_hidden_layers))

    # Warm-up (first calls allocate), then the bare loop over exactly the batches the run will use.
    plan = build_plan(cfg, encoder, progress=False)
    storage_codec = TextStorage(storage, llm.dtype)
    row_bytes = storage_codec.row_bytes(len(encoder.layers), llm.hidden_size)["features"]
    layout = ShardLayout.plan(int(plan.offsets[-1]), row_bytes, cfg.shard_bytes, cfg.chunk_bytes)
    texts_all = plan.index.column("text").to_pylist()
    batches = []
    for s in range(layout.n_shards):
        work = shard_work(s, layout, plan.offsets, cfg)
        batches += work.batches + [[c] for c in work.alone]
    ids = [[t.ids for t in encoder.tokenize([texts_all[c] for c in b])] for b in batches]
    encoder.forward(ids[0])

    t0 = time.perf_counter()
    for batch in ids:
        encoder.forward(batch)
    bare = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = encode_text(cfg, llm=llm)
    full = time.perf_counter() - t0
    tokens = int(plan.offsets[-1])
    from semroute.shared.inspect import describe

    info = describe(str(out))
    return {
        "storage": storage,
        "compute_dtype": str(llm.dtype).removeprefix("torch."),
        "captions": len(texts),
        "tokens": tokens,
        "bare_tokens_per_s": tokens / bare,
        "encode_text_tokens_per_s": tokens / full,
        "ratio": bare / full,
        "padding_efficiency": padding_efficiency(layout, plan.offsets, cfg),
        "written_captions": summary["encoded_captions_this_run"],
        "bytes_per_token_layer_value": info["bytes per token-layer value"],
        "store": str(out),
    }


def bench_reads(store: Path, tmp: Path, batches: int = 50, batch_size: int = 64, seed: int = 0) -> dict:
    import zarr

    from semroute.shared.text_store import TextCacheReader

    reader = TextCacheReader(store)
    offsets = reader.offsets
    raw = np.asarray(zarr.open_group(str(store))["features"][:])
    flat = tmp / "features.raw"
    raw.tofile(flat)
    mm = np.memmap(flat, dtype=raw.dtype, mode="r", shape=raw.shape)
    row_bytes = raw[0].nbytes
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(reader), batch_size, replace=False) for _ in range(batches)]
    nbytes = sum(int((offsets[p + 1] - offsets[p]).sum()) * row_bytes for p in picks)
    n_caps = batches * batch_size

    def timed(fn) -> float:
        fn(picks[0])
        t0 = time.perf_counter()
        for p in picks:
            fn(p)
        return time.perf_counter() - t0

    t_reader = timed(lambda p: [reader.caption(int(i)) for i in p])
    t_memmap = timed(lambda p: [torch.from_numpy(np.array(mm[offsets[i]: offsets[i + 1]])).view(torch.bfloat16)
                                for i in p])
    arr = zarr.open_group(str(store))["features"]
    t_zarr = timed(lambda p: [arr[int(offsets[i]): int(offsets[i + 1])] for i in p])
    return {
        "batch_size": batch_size,
        "reader_captions_per_s": n_caps / t_reader,
        "reader_MB_per_s": nbytes / t_reader / 1e6,
        "memmap_captions_per_s": n_caps / t_memmap,
        "memmap_MB_per_s": nbytes / t_memmap / 1e6,
        "zarr_slicing_captions_per_s": n_caps / t_zarr,
        "reader_over_memmap": t_memmap / t_reader,
        "zarr_over_memmap": t_memmap / t_zarr,
    }


def bench_memory(sizes: list[int], tmp: Path, threads: int) -> list[dict]:
    out = []
    for n in sizes:
        manifest = write_manifest(tmp / f"mem-{n}.jsonl", prompts(n))
        cmd = [sys.executable, "-c",
               "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "from semroute.cli import main\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\n"
               "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
               "semroute", "encode-text", str(manifest), "--llm", "smollm2", "--out", str(tmp / f"mem-{n}.text.zarr"),
               "--no-progress", "--overwrite", "--dtype", "float32", "--storage", "bf16"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or "cache:" not in proc.stdout:
            raise RuntimeError(proc.stdout + proc.stderr)
        rss = int(proc.stdout.split("MAXRSS_KB")[1].split()[0])
        out.append({"captions": n, "peak_rss_MiB": rss / 1024, "seconds": time.perf_counter() - t0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=1600)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-sizes", default="400,3200")
    parser.add_argument("--dtype", default="float32", help="LLM compute dtype for the throughput runs "
                        "(CPU bf16 matmuls are ~7x slower than float32 here)")
    parser.add_argument("--bf16-captions", type=int, default=100, help="captions for the exact-bf16 bytes check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from semroute.shared.llm import load_llm

    llm = load_llm("smollm2", device="cpu", dtype=args.dtype)
    texts = prompts(args.captions)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"torch threads {args.threads}", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        storages = ("exact", "bf16", "fp8") if llm.dtype == torch.float32 else ("exact", "fp8")
        results["throughput"] = [bench_throughput(llm, texts, tmp, args.batch_tokens, s) for s in storages]
        if llm.dtype != torch.bfloat16 and args.bf16_captions:
            # Bytes of exact storage with bf16 compute (the default on GPUs), on a small set: slow on CPUs.
            del llm
            bf16 = load_llm("smollm2", device="cpu", dtype="bfloat16")
            results["exact_bf16_bytes"] = bench_throughput(bf16, texts[: args.bf16_captions], tmp, args.batch_tokens,
                                                           "exact", tag="-bf16")
        bf16_store = next((r["store"] for r in results["throughput"] if r["storage"] == "bf16"), None)
        results["reads"] = bench_reads(Path(bf16_store or results["throughput"][0]["store"]), tmp)
        results["memory"] = bench_memory([int(x) for x in args.memory_sizes.split(",")], tmp, args.threads)
    print(json.dumps(results, indent=2, default=lambda x: round(x, 4) if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    main()
