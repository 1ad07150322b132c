"""Watching a run from the caches alone: a held-out split, a validation loss on a fixed grid of noise
levels, and sample grids of held-out captions.

* :func:`holdout_split` picks the held-out samples from the seed and the dataset size only, so every
  process and every resume picks the same ones (the trainer also records their ids in run.json).
* :class:`ValidationLoss` is the flow-matching loss of :mod:`objective` on those samples at sigmas
  ``(k + 0.5) / n`` with noise drawn from each sample's id: the same inputs at every validation of every
  run, whatever the seed, strategy or number of processes, so the numbers are comparable. Each process
  takes every ``world``-th held-out sample; sums are reduced across processes.
* :class:`SampleGrid` draws a few held-out captions (their cached features: the LLM never runs) with the
  sampling pipeline of :mod:`pipeline` and writes ``RUN/samples/step-NNNNNNN.png``: one row per
  caption, the ground truth decoded from its latent, then the current (and EMA) weights' sample.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semroute.stage2_train.data import PairedCaches, mix_seed
from semroute.stage2_train.objective import noisy_input

LABEL_WIDTH, HEADER_HEIGHT = 300, 32  # sample sheets: caption column, title + column names
HOLDOUT_SALT = 0x401D0  # mixed into the seed: the split differs from the batch order


def holdout_split(n_samples: int, n_holdout: int, seed: int) -> np.ndarray:
    """Sorted dataset indices of the ``n_holdout`` held-out samples (a seeded random choice)."""
    rng = np.random.default_rng(mix_seed(seed, HOLDOUT_SALT))
    return np.sort(rng.permutation(n_samples)[:n_holdout]).astype(np.int64)


def sigma_grid(n: int) -> list[float]:
    """The validation noise levels: midpoints of ``n`` equal bins of (0, 1)."""
    return [(k + 0.5) / n for k in range(n)]


@dataclass
class HeldOut:
    """One held-out sample as the validation uses it: its first caption, the latent's mean (exact caches:
    the latent), and its fixed noise."""

    sample_id: str
    caption: int
    text: torch.Tensor  # [n_tokens, L, D]
    latent: torch.Tensor  # [C, h, w] in the DiT's space
    noise: torch.Tensor  # [C, h, w]


def load_heldout(dataset: PairedCaches, index: int) -> HeldOut:
    pos = int(dataset.latent_pos[index])
    sample_id = dataset.latents.sample_ids[pos]
    caption = int(dataset.caption_idx[dataset.caption_ptr[index]])
    latent = dataset.latents.latent(pos, mode="mean")
    # The noise depends on the sample id only (crc32: stable across processes and Python versions).
    g = torch.Generator().manual_seed(mix_seed(zlib.crc32(sample_id.encode()), 0xE95))
    noise = torch.randn(latent.shape, generator=g, dtype=torch.float32)
    return HeldOut(sample_id, caption, dataset.text.caption(caption), latent, noise)


class ValidationLoss:
    """``compute(model)`` -> per-sigma mean loss over all held-out samples (all processes)."""

    def __init__(self, dataset: PairedCaches, indices: np.ndarray, *, n_sigmas: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.mine = [int(i) for i in indices[rank::world_size]]
        self.total = len(indices)
        self.sigmas = sigma_grid(n_sigmas)
        self.batch_size = batch_size

    def batches(self):
        """This process's held-out samples, ``batch_size`` at a time, never mixing latent shapes."""
        from semroute.shared.text_store import pad_batch

        buckets = self.dataset.bucket_ids()
        for b in sorted({int(buckets[i]) for i in self.mine}):
            members = [i for i in self.mine if buckets[i] == b]
            for s in range(0, len(members), self.batch_size):
                items = [load_heldout(self.dataset, i) for i in members[s: s + self.batch_size]]
                text, mask = pad_batch([it.text for it in items])
                yield (text, mask, torch.stack([it.latent for it in items]), torch.stack([it.noise for it in items]))

    @torch.no_grad()
    def compute(self, model, accelerator) -> dict[float, float]:
        """Mean over held-out samples of the per-sample MSE, per sigma. A collective: every process calls it."""
        device = accelerator.device
        sums = torch.zeros(len(self.sigmas), dtype=torch.float64, device=device)
        for text, mask, x0, eps in self.batches():
            text, mask, x0, eps = text.to(device), mask.to(device), x0.to(device), eps.to(device)
            with accelerator.autocast():
                context = model.prepare_text(text, mask)  # the text side once for all sigmas, as sampling does
            for k, s in enumerate(self.sigmas):
                sigma = torch.full((x0.shape[0],), s, device=device)
                xt, target = noisy_input(x0, sigma, eps)  # [B, C, h, w] each
                with accelerator.autocast():
                    pred = model(xt, sigma * 1000.0, text_context=context, return_dict=False)[0]
                sums[k] += (pred.float() - target.float()).pow(2).flatten(1).mean(1).sum().double()
        sums = accelerator.reduce(sums, "sum")
        return {s: float(v) / self.total for s, v in zip(self.sigmas, sums.tolist())}


class SampleGrid:
    """Samples of the first ``n`` held-out captions, drawn with fixed seeds, beside their ground truth.
    Main process only; builds the pipeline's autoencoder from the latent cache's fingerprint once."""

    def __init__(self, dataset: PairedCaches, indices: np.ndarray, *, n: int, stored_layers: list[int],
                 null_features: torch.Tensor, latent_fingerprint: dict, shift: float, steps: int, guidance: float,
                 guidance_interval: list | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from semroute.stage2_train.pipeline import _vae_from_fingerprint

        self.items = [load_heldout(dataset, int(i)) for i in indices[:n]]
        texts = dataset.text.index.column("text").to_pylist()
        self.captions = [texts[it.caption] for it in self.items]
        self.vae, _ = _vae_from_fingerprint(latent_fingerprint)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        self.stored_layers, self.null = stored_layers, null_features
        self.steps, self.guidance, self.guidance_interval = steps, guidance, guidance_interval
        self._truth: list | None = None

    def pipeline(self, model):
        from semroute.stage2_train.pipeline import SemroutePipeline

        pipe = SemroutePipeline(model, self.vae, self.scheduler)
        pipe.attach_cached_text(self.stored_layers, self.null)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def truth(self, pipe) -> list:
        if self._truth is None:
            from semroute.stage2_train.pipeline import to_pil

            self._truth = to_pil(pipe.decode_latents(torch.stack([it.latent for it in self.items])))
        return self._truth

    @torch.no_grad()
    def draw(self, model) -> list:
        """One PIL image per held-out caption; caption i always starts from the noise of seed i."""
        pipe = self.pipeline(model)
        generators = [torch.Generator().manual_seed(i) for i in range(len(self.items))]
        h, w = self.items[0].latent.shape[-2:]
        down = pipe.vae_downsample
        return pipe(prompt_features=[it.text for it in self.items], num_inference_steps=self.steps,
                    guidance_scale=self.guidance, guidance_interval=self.guidance_interval, generator=generators,
                    height=h * down, width=w * down).images

    def write(self, columns: dict[str, list], path: Path, title: str) -> "Image.Image":  # noqa: F821
        """``columns``: name -> one image per caption (ground truth first). Returns the sheet it saved."""
        from PIL import Image, ImageDraw

        names = list(columns)
        w, h = columns[names[0]][0].size
        scale = max(1, 96 // max(w, h))  # 32-pixel samples are enlarged to be seen
        cw, ch = w * scale, h * scale
        label_w, head = LABEL_WIDTH, HEADER_HEIGHT
        sheet = Image.new("RGB", (cw * len(names) + label_w, head + ch * len(self.items)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        draw.text((4, 2), title, fill=(0, 0, 0))
        for c, name in enumerate(names):
            draw.text((c * cw + 4, 17), name, fill=(90, 90, 90))
            for r, img in enumerate(columns[name]):
                x, y = c * cw, head + r * ch
                sheet.paste(img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (x, y))
                draw.rectangle([x, y, x + cw - 1, y + ch - 1], outline=(215, 215, 215))  # cells on white stay apart
        for r, caption in enumerate(self.captions):
            draw.text((cw * len(names) + 6, head + r * ch + ch // 2 - 6), caption[:48], fill=(0, 0, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        return sheet
