"""Benchmark for training from caches (issue 5): four ways to run the same DiT steps, side by side.

  (a) cached   the real loader (PairedCaches + EpochBatches + DataLoader workers) feeding the step
  (b) online   the reference's way: every step runs the LLM on the batch's captions padded to the max
               length (512) and the VAE on its images, then the same DiT step
  (b') online  the strongest online variant: the same, with captions padded only to the batch's longest
  (c) compute  the DiT step alone on the same batches, already on the device (the floor for (a))

Same DiT preset, batch size, captions and images in all four. Images for (b)/(b') are decoded to
tensors in memory up front, so only the LLM and VAE forward passes are added per step.

CPU (this machine):   python bench/bench_train.py --llm smollm2 --preset small --vae pixel --size 32
GPU (paper preset):   python bench/bench_train.py --llm random-qwen3-4b --preset paper --vae random-flux --size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO.parent / "shared" / "data" / "genaibench" / "genai_image.json"


def captions(n: int, source: Path = PROMPTS) -> list[str]:
    items = list(json.loads(Path(source).read_text()).values())
    return [" " + items[i % len(items)]["prompt"] for i in range(n)]


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.full((size, size, 3), 255, np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, size * 3 // 4, 2)
            w = int(rng.integers(size // 8, size // 4))
            img[y: y + w, x: x + w] = rng.integers(0, 255, 3)
        path = folder / f"{i:05d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def bpe_tokenizer(corpus: list[str], vocab: int = 8000):
    """A byte-level BPE trained on the prompts: realistic token counts for a random-weight LLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")


def load_bench_llm(name: str, device: torch.device, corpus: list[str]):
    from semroute.shared.llm import LoadedLLM, load_llm, tokenizer_sha256

    if not name.startswith("random-qwen3"):
        dtype = "float32" if device.type == "cpu" else "bfloat16"  # CPU bf16 matmuls are slow
        return load_llm(name, device=str(device), dtype=dtype)
    # random-qwen3-4b: Qwen3-VL-4B's text tower dimensions (36 layers, width 2560, 32/8 heads of 128,
    # MLP 9728) with random weights; random-qwen3-tiny: a dry-run size for CPUs.
    from transformers import Qwen3Config, Qwen3Model

    tok = bpe_tokenizer(corpus)
    dims = (dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128) if name == "random-qwen3-4b" else
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16))
    cfg = Qwen3Config(vocab_size=len(tok), max_position_embeddings=4096, **dims)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        decoder = Qwen3Model(cfg).to(dtype).eval().requires_grad_(False)
    n, d = dims["num_hidden_layers"], dims["hidden_size"]
    identity = {"ref": name, "kind": "random", "revision": None, "architecture": "Qwen3Model",
                "num_hidden_layers": n, "hidden_size": d, "weights_sha256": f"{name}-seed-0",
                "tokenizer_sha256": tokenizer_sha256(tok)}
    return LoadedLLM(decoder, tok, name, n, d, dtype, device, identity)


def save_random_flux_vae(folder: Path, tiny: bool = False) -> Path:
    """An AutoencoderKL with the FLUX VAE's configuration (16 latent channels, /8), random weights
    (``tiny``: narrow blocks, for a dry run on a CPU)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
                        norm_num_groups=4 if tiny else 32, layers_per_block=1 if tiny else 2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vae", default="pixel", help="pixel | random-flux | random-flux-tiny")
    parser.add_argument("--model", default="{}", help="JSON overrides of the DiT preset (dry runs)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="write the results JSON here too")
    parser.add_argument("--prompts", default=str(PROMPTS), help="GenAI-Bench's genai_image.json (captions)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip-online", action="store_true", help="skip (b) and (b')")
    parser.add_argument("--online-steps", type=int, default=None, help="timed steps for (b)/(b') (default: --steps)")
    parser.add_argument("--diagnose", action="store_true", help="also time the loader alone and compute on varied batches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from semroute.shared.latent_store import LatentCacheReader
    from semroute.shared.text_encoder import PromptFormat, TextEncoder
    from semroute.shared.vae import load_encoder
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text
    from semroute.stage2_train.data import BatchLoader, EpochBatches, PairedCaches
    from semroute.stage2_train.dit import SemrouteDiT
    from semroute.stage2_train.objective import flow_loss

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    texts = captions(args.samples, Path(args.prompts))
    t0 = time.perf_counter()
    llm = load_bench_llm(args.llm, device, texts)
    paths = make_images(tmp / "img", args.samples, args.size)
    manifest = tmp / "data.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": str(p), "text": t}) + "\n"
                                for i, (p, t) in enumerate(zip(paths, texts))))
    vae_ref = "pixel" if args.vae == "pixel" else str(save_random_flux_vae(tmp / "vae", tiny=args.vae.endswith("tiny")))
    text_cache, latent_cache = tmp / "t.text.zarr", tmp / "l.latents.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(text_cache), llm=args.llm, progress=False,
                                 max_length=args.max_length, overwrite=True, batch_tokens=16384), llm=llm)
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(latent_cache), vae=vae_ref, resolution=args.size,
                                     progress=False, overwrite=True, workers=max(0, args.workers)))
    setup_s = time.perf_counter() - t0

    dataset = PairedCaches(str(text_cache), str(latent_cache), text_layers=None, seed=0, caption_dropout=0.1)
    latents_reader = LatentCacheReader(latent_cache)
    with torch.device(device):  # the paper preset has 2.2B parameters: initialise them on the GPU
        model = SemrouteDiT.from_preset(args.preset, fusion="depth", text_dim=llm.hidden_size,
                                        llm_num_layers=llm.num_hidden_layers, in_channels=latents_reader.latent_channels,
                                        **json.loads(args.model))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x0, text, mask, seed):
        g = torch.Generator(device).manual_seed(seed)
        with amp:
            loss = flow_loss(model, x0, text, mask, shift=3.0, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(batches, fn) -> float:
        """Seconds per step over ``args.steps`` steps after ``args.warmup`` warm-up steps."""
        it = iter(batches)
        for k in range(args.warmup):
            fn(next(it), k)
        sync()
        start = time.perf_counter()
        for k in range(args.steps):
            fn(next(it), args.warmup + k)
        sync()
        return (time.perf_counter() - start) / args.steps

    plan = EpochBatches(dataset.bucket_ids(), dataset.text_lengths(), args.batch_size, seed=0)
    results = {}

    # (c) compute only: exactly the batches (a) will load, in the same order, already on the device
    # (the plan and every per-sample draw are seeded, so a fresh loader yields the same batches).
    # Captions are padded to each batch's longest, so one fixed batch would not be the same work.
    preloaded = [b.to(device) for _, b in zip(range(args.warmup + args.steps), BatchLoader(dataset, plan, num_workers=0))]
    results["c_compute"] = timed(iter(preloaded), lambda b, k: step(b.latents, b.text, b.text_mask, k))
    fixed = preloaded[0]
    results["c_compute_one_batch"] = timed(iter(lambda: fixed, None),
                                           lambda b, k: step(b.latents, b.text, b.text_mask, k))
    del preloaded

    # (a) from the caches through the real loader.
    loader = BatchLoader(dataset, plan, num_workers=args.workers, pin_memory=device.type == "cuda")

    def cached(b, k):
        b = b.to(device)
        step(b.latents, b.text, b.text_mask, k)

    results["a_cached"] = timed(loader, cached)
    print("timed (c) and (a):", results, flush=True)
    if args.diagnose:
        diag = {}
        for nw in (0, 4, 8):
            it = iter(BatchLoader(dataset, plan, num_workers=nw, pin_memory=device.type == "cuda"))
            for _ in range(3):
                next(it).to(device)
            sync()
            t0 = time.perf_counter()
            for _ in range(20):
                next(it).to(device)
            sync()
            diag[f"loader_only_s_per_batch_workers{nw}"] = round((time.perf_counter() - t0) / 20, 4)
        diag["a_cached_workers0"] = round(timed(BatchLoader(dataset, plan, num_workers=0), cached), 4)
        varied = [b.to(device) for _, b in zip(range(8), BatchLoader(dataset, plan, num_workers=0))]
        diag["c_compute_varied_batches"] = round(timed(iter(lambda: varied[int(time.perf_counter() * 1e6) % 8], None),
                                                      lambda b, k: step(b.latents, b.text, b.text_mask, k)), 4)
        results_diag = diag
        print("diagnose:", diag, flush=True)

    # (b), (b'): LLM + VAE inside the step, on the same samples.
    index = dataset.text.index.to_pydict()
    text_of = {sid: t for sid, t in zip(index["sample_id"], index["text"])}
    from semroute.shared import images as im

    opts = im.ImageOptions(resolution=args.size)
    pixels = {str(i): torch.from_numpy(im.load_image(str(p), opts)[0]) for i, p in enumerate(paths)}
    vae = load_encoder(vae_ref, device=str(device), dtype="float32" if device.type == "cpu" else "bfloat16")
    encoder = TextEncoder(llm, PromptFormat(max_length=args.max_length), dataset.text.layers)
    pad_id = encoder.pad_id

    def online(pad_to_max: bool):
        def run(b, k):
            ids = [t.ids for t in encoder.tokenize([text_of[s] for s in b.sample_ids])]
            if pad_to_max:  # the reference pads every caption to max_length
                feats, mask = _forward_padded(encoder, ids, args.max_length, pad_id)
            else:
                feats, mask = encoder.forward(ids)
            px = torch.stack([pixels[s] for s in b.sample_ids])
            out = vae.encode(px)
            if "mean" in out:
                z = out["mean"].float() + torch.exp(0.5 * out["logvar"].float()) * torch.randn_like(out["mean"].float())
            else:
                z = out["latent"].float() / 127.5 - 1 if out["latent"].dtype == torch.uint8 else out["latent"].float()
            x0 = latents_reader.normalize(z).to(device)
            step(x0, feats.to(device), mask.to(device), k)
        return run

    if not args.skip_online:
        full_steps, full_warmup = args.steps, args.warmup
        args.steps, args.warmup = args.online_steps or args.steps, min(args.warmup, 1 if args.online_steps else args.warmup)
        results["b_online_pad512"] = timed(BatchLoader(dataset, plan, num_workers=0), online(True))
        results["b2_online_dynamic"] = timed(BatchLoader(dataset, plan, num_workers=0), online(False))
        args.steps, args.warmup = full_steps, full_warmup

    lengths = dataset.text.lengths
    report = {
        "machine": _machine(device),
        "date": time.strftime("%Y-%m-%d"),
        "llm": args.llm, "preset": args.preset, "vae": args.vae, "image_size": args.size,
        "batch_size": args.batch_size, "steps_timed": args.steps, "loader_workers": args.workers,
        "dit_params": sum(p.numel() for p in model.parameters()),
        "mean_caption_tokens": float(lengths.mean()), "setup_seconds": round(setup_s, 1),
        "seconds_per_step": {k: round(v, 4) for k, v in results.items()},
        "samples_per_s": {k: round(args.batch_size / v, 2) for k, v in results.items()},
        "a_over_c_time": round(results["a_cached"] / results["c_compute"], 3),
    }
    if not args.skip_online:
        report["b_over_a_time"] = round(results["b_online_pad512"] / results["a_cached"], 2)
        report["b2_over_a_time"] = round(results["b2_online_dynamic"] / results["a_cached"], 2)
    if args.diagnose:
        report["diagnose"] = results_diag
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _forward_padded(encoder, ids: list[list[int]], length: int, pad_id: int):
    """Like ``TextEncoder.forward``, but every caption padded to ``length`` tokens, as the reference
    batches them (the mask still hides the pads)."""
    llm = encoder.llm
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.bool)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = True
    out = llm.decoder(input_ids=input_ids.to(llm.device), attention_mask=mask.to(llm.device, torch.long),
                      output_hidden_states=True, use_cache=False)
    feats = torch.stack([out.hidden_states[i] for i in encoder.layers], dim=2)
    return feats, mask


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
