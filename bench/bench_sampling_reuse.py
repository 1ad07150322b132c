"""Sampling with the per-prompt text keys/values computed once vs recomputed at every step (issue 6).

A randomly initialised DiT and random cached features of the given LLM size: the model-side cost of
``pipe(..., reuse_text=True|False)`` for 25 Euler steps with classifier-free guidance, interleaved,
best of ``--repeats``. The LLM's own forward (once per prompt either way) is not included.

    python bench/bench_sampling_reuse.py --preset small --layers 36 --dim 2560 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--fusion", default="depth")
    parser.add_argument("--layers", type=int, default=36, help="LLM layers read (hidden_states 1..L)")
    parser.add_argument("--dim", type=int, default=2560, help="LLM width")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length")
    parser.add_argument("--batch", type=int, default=4, help="prompts per call")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from semroute.shared.text_store import pad_batch
    from semroute.stage2_train.dit import SemrouteDiT

    torch.manual_seed(0)
    model = SemrouteDiT.from_preset(args.preset, fusion=args.fusion, text_dim=args.dim, llm_num_layers=args.layers)
    model.eval()
    channels = model.config.in_channels
    cond = [torch.randn(args.tokens, args.layers, args.dim) for _ in range(args.batch)]
    null = [torch.randn(5, args.layers, args.dim)] * args.batch
    text, mask = pad_batch(cond + null)

    @torch.no_grad()
    def run(reuse: bool) -> float:
        x = torch.randn(args.batch, channels, args.size, args.size)
        t0 = time.perf_counter()
        ctx = model.prepare_text(text, mask) if reuse else None
        for k in range(args.steps):
            t = torch.full((2 * args.batch,), 1000.0 * (1 - k / args.steps))
            inp = torch.cat([x, x])
            if reuse:
                v = model(inp, t, text_context=ctx, return_dict=False)[0]
            else:
                v = model(inp, t, text, mask, return_dict=False)[0]
            vc, vu = v.chunk(2)
            x = x - (vu + 6.0 * (vc - vu)) / args.steps
        return (time.perf_counter() - t0) / args.batch

    run(True)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(args.repeats):
        for reuse in (True, False):
            best[reuse] = min(best[reuse], run(reuse))
    print(json.dumps({
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "fusion": args.fusion,
        "text": f"{args.tokens} tokens x {args.layers} layers x {args.dim}", "latent": f"{channels}x{args.size}x{args.size}",
        "steps": args.steps, "guidance": "cfg (2x batch)",
        "seconds_per_image_reuse": round(best[True], 4), "seconds_per_image_recompute": round(best[False], 4),
        "recompute_over_reuse": round(best[False] / best[True], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
