"""Forward+backward time of the DiT per fusion strategy, and the saving from layer-normalising once.

    python bench/bench_model.py [--preset small] [--batch 8] [--tokens 32] [--rounds 7]

For every strategy it times one training step's forward+backward of the full model on random inputs.
Next to it, side by side in the same rounds, it times a *per-block* variant that does what a direct
implementation of the design's formula does: every DiT block layer-normalises all L cached layers
again and mixes them on its own (no batched block x layer contraction). Variants alternate within each
round and the minimum over rounds is reported (as timeit advises: the run least disturbed by other
processes on a shared machine), so background load affects both alike. Printed ratios
are per-block / ours, for the whole step and for the text side alone (prepare_text forward+backward).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from semroute.stage2_train.dit import SemrouteDiT, TextContext
from semroute.stage2_train.fusion import FUSIONS, layer_norm_layers


class PerBlockLayerNormDiT(SemrouteDiT):
    """Bench-only baseline: LN and the layer mixture redone inside each block's text path."""

    def prepare_text(self, text_features, text_mask=None):
        mask = text_mask.bool()
        attn_mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        context = TextContext(mask=mask, attn_mask=attn_mask, hidden_ln=text_features)  # raw, not LN'd
        if not self.router.time_dependent:
            context.kv, context.hidden_ln = self._text_kv(text_features, mask, None), None
        return context

    def _text_kv(self, raw, mask, sigma):
        router, padding, kv = self.router, ~mask[:, None, :, None], []
        weights = router.weights(sigma)  # [(B,) (blocks,) L]
        for index, block in enumerate(self.blocks):
            hidden_ln = layer_norm_layers(raw)  # again for every block
            if router.name == "penultimate":
                fused = hidden_ln[:, :, router.position]
            elif router.name == "uniform":
                fused = hidden_ln.mean(2)
            else:
                w = weights[..., index, :] if router.per_block else weights  # [(B,) L]
                fused = torch.einsum("bl,btld->btd" if w.ndim == 2 else "l,btld->btd", w, hidden_ln)
            key, value = block.cross_attn.project_text(self.context_embedder(fused))
            kv.append((key, value.masked_fill(padding, 0.0)))
        return tuple(kv)


def make_inputs(model, batch, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    side = 16  # small preset: 32x32 images through the pixel codec (p=2) -> 12 x 16 x 16
    latents = torch.randn(batch, c.in_channels, side, side, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    # Realistic ragged captions: lengths between half and all of `tokens`, zero padding, bf16 as cached.
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=gen)
    lengths[0] = tokens
    mask = torch.arange(tokens)[None] < lengths[:, None]
    features = torch.randn(batch, tokens, len(model.text_layers), c.text_dim, generator=gen) * mask[..., None, None]
    return latents, timestep, features.to(torch.bfloat16), mask


def time_step(model, inputs):
    latents, timestep, features, mask = inputs
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(latents, timestep, features, mask).sample.square().mean().backward()
    return time.perf_counter() - start


def time_text(model, inputs):
    _, timestep, features, mask = inputs
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    context = model.prepare_text(features, mask)
    kv = context.kv or model._text_kv(context.hidden_ln, context.mask, timestep / 1000)
    sum(k.square().mean() + v.square().mean() for k, v in kv).backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    print(f"# {args.preset} preset, batch {args.batch}, {args.tokens} text tokens, {args.threads} threads, "
          f"{model_name}, torch {torch.__version__}")
    print(f"{'fusion':<12} {'layers':>6} {'params':>10} {'step ms':>9} {'per-block LN ms':>16} {'ratio':>6} "
          f"{'text ms':>8} {'per-block text ms':>18} {'text ratio':>10}")
    for name in FUSIONS:
        torch.manual_seed(0)
        ours = SemrouteDiT.from_preset(args.preset, fusion=name).train()
        baseline = PerBlockLayerNormDiT.from_preset(args.preset, fusion=name).train()
        baseline.load_state_dict(ours.state_dict())
        inputs = make_inputs(ours, args.batch, args.tokens)
        times = {key: [] for key in ("ours", "base", "ours_text", "base_text")}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            sample = {"ours": time_step(ours, inputs), "base": time_step(baseline, inputs),
                      "ours_text": time_text(ours, inputs), "base_text": time_text(baseline, inputs)}
            if round_index:
                for key, value in sample.items():
                    times[key].append(value * 1000)
        med = {key: min(values) for key, values in times.items()}
        params = sum(p.numel() for p in ours.parameters())
        print(f"{name:<12} {len(ours.text_layers):>6} {params:>10,} {med['ours']:>9.1f} {med['base']:>16.1f} "
              f"{med['base'] / med['ours']:>6.2f} {med['ours_text']:>8.1f} {med['base_text']:>18.1f} "
              f"{med['base_text'] / med['ours_text']:>10.2f}")


if __name__ == "__main__":
    main()
