"""Routing weights as numbers (CSV) and pictures (PNG): blocks x LLM layers for depth-wise gates, a
curve over sigma for time-wise ones, both for joint ones.

Written by the trainer at every checkpoint and by ``semroute routing RUN`` (``run_folder.open_model``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from semroute.shared.files import write_atomic
from semroute.shared.interrupts import stoppable

SIGMA_GRID = np.linspace(0.0, 1.0, 21)


@torch.no_grad()
def routing_table(model) -> dict:
    """Every routing weight of ``model`` as numpy arrays.

    Returns ``{"fusion", "layers", "blocks", "sigmas", "weights"}`` with ``weights`` shaped
    ``[S, blocks, L]`` over ``sigmas`` (S = 1 and sigma = None for strategies that ignore sigma).
    """
    fusion = model.config.fusion
    layers = list(model.text_layers if hasattr(model, "text_layers") else model.config.text_layers)
    blocks = int(model.config.num_blocks)
    time_dependent = bool(getattr(getattr(model, "router", None), "time_dependent", False))
    sigmas = SIGMA_GRID if time_dependent else np.array([np.nan])
    w = model.routing_weights(torch.tensor(sigmas, dtype=torch.float32) if time_dependent else None)
    w = w.float().cpu().numpy()
    if not time_dependent:
        w = w[None]
    if w.ndim == 2:  # [S, L]: one mixture shared by all blocks
        w = np.repeat(w[:, None, :], blocks, axis=1)
    return {"fusion": fusion, "layers": layers, "blocks": blocks, "sigmas": sigmas, "weights": w}


def write_csv(table: dict, path: Path) -> None:
    """Long format: one row per (sigma, block, layer) with its weight. Written whole through a rename: a rerun of
    ``semroute routing`` stopped midway leaves the earlier file intact."""
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(["fusion", "sigma", "block", "llm_layer", "weight"])
    for s, sigma in enumerate(table["sigmas"]):
        for b in range(table["blocks"]):
            for l, layer in enumerate(table["layers"]):
                out.writerow([table["fusion"], "" if np.isnan(sigma) else f"{sigma:.3f}", b, layer,
                              f"{table['weights'][s, b, l]:.6g}"])
    write_atomic(path, text.getvalue())


def plot(table: dict, path: Path, title: str = "") -> None:
    """A heatmap of blocks x layers (at sigma 0.5 for sigma-dependent gates), plus for time-wise and
    joint gates a heatmap of sigma x layers (averaged over blocks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, layers, sigmas = table["weights"], table["layers"], table["sigmas"]
    timed = not np.isnan(sigmas[0])
    mid = int(np.argmin(np.abs(sigmas - 0.5))) if timed else 0
    ncols = 2 if timed else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols + 1, 0.35 * table["blocks"] + 2.5), squeeze=False)
    ax = axes[0, 0]
    # Colors span the weights' own range: early in training they sit within a hair of uniform (1/L).
    im = ax.imshow(w[mid], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("LLM layer (hidden_states index)")
    ax.set_ylabel("DiT block")
    ax.set_title(f"{table['fusion']} routing" + (f" at sigma={sigmas[mid]:.2f}" if timed else "")
                 + f" (uniform = 1/{len(layers)} = {1 / len(layers):.3f})", fontsize=10)
    _layer_ticks(ax, layers)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if timed:
        ax = axes[0, 1]
        im = ax.imshow(w.mean(axis=1), aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, len(layers) - 0.5, sigmas[-1], sigmas[0]))
        ax.set_xlabel("LLM layer (hidden_states index)")
        ax.set_ylabel("sigma (noise level)")
        ax.set_title("weights over sigma (mean over blocks)")
        _layer_ticks(ax, layers)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, png.getvalue())  # whole, as write_csv's


def _layer_ticks(ax, layers: list[int]) -> None:
    step = max(1, len(layers) // 12)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(layers[i]) for i in ticks])


def save_routing(model, folder: Path, stem: str, title: str = "") -> tuple[Path, Path]:
    """Write ``<stem>.png`` and ``<stem>.csv`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    table = routing_table(model)
    png, csv_path = folder / f"{stem}.png", folder / f"{stem}.csv"
    with stoppable(f"earlier {png.name} and {csv_path.name} in {folder} are kept whole: run the same command again"):
        plot(table, png, title)
        write_csv(table, csv_path)
    return png, csv_path


def summary(model, sigma: float = 0.5) -> dict:
    """Per-block entropy (nats) and top layer, for the training log."""
    s = model.routing_summary(sigma)
    return {"entropy": [round(float(e), 4) for e in s["entropy"]], "top_layer": s["top_layer"]}

