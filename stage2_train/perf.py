"""Step speed: regional compilation of the DiT, and model FLOPs utilisation (MFU).

MFU = model FLOPs per second / the device's peak. The FLOPs are counted from the model's config
(the matrix products of a training step: forward + backward = 3 x forward, real caption tokens only, not
the padding and not the recomputation of gradient checkpointing), so the number says how much of the
hardware the useful work uses.
"""

from __future__ import annotations

import torch

from semroute.shared.errors import SemrouteError

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
]


def peak_flops(device: torch.device | str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: ``override_tflops`` if given, else from the table; None
    when unknown (CPUs), so no MFU is reported rather than a made-up one."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise SemrouteError(f"peak_tflops must be > 0, got {override_tflops}")
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def dit_train_flops(config, image_tokens: int, text_tokens: float, batch: int = 1) -> float | None:
    """Matrix-product FLOPs of one training step (forward + backward) of a ``SemrouteDiT`` config.

    ``image_tokens``: N per sample, ``text_tokens``: real caption tokens T per sample (mean), ``batch``
    samples. Per block: self-attention projections on N tokens and its N x N products, cross-attention
    queries/outputs on N tokens, text keys/values on T tokens and the N x T products, the SwiGLU MLP, the
    adaLN modulation; plus patch embedding, output projection and the context embedder (once per block
    for per-block fusions). Element-wise work (norms, the layer mixture, softmax) is not counted.
    Returns None for configs it does not describe (deep fusion).
    """
    if config.get("fusion") in (None, "deep") or "num_heads" not in config:
        return None
    d, nb = config.hidden_size, config.num_blocks
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    N, T = float(image_tokens), float(text_tokens)
    patch = config.in_channels * config.patch_size ** 2
    per_block = (2 * N * d * (2 * q + 2 * kv)  # self-attention q, k, v, out
                 + 2 * 2 * N * N * q  # QK^T and AV over image tokens
                 + 2 * N * d * 2 * q + 2 * T * d * 2 * kv  # cross-attention q/out, text k/v
                 + 2 * 2 * N * T * q  # QK^T and AV over text tokens
                 + 2 * N * d * 3 * config.mlp_hidden_size  # SwiGLU: gate, up, down
                 + (2 * d * 6 * d if config.adaln else 0))
    embed_times = nb if config.fusion in ("depth", "joint") else 1
    forward = nb * per_block + 2 * N * patch * d * 2 + embed_times * 2 * T * config.text_dim * d
    return 3.0 * forward * batch


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional compilation: ``torch.compile`` each DiT block in place (the blocks share one code object,
    so one compilation serves all of them per input shape), leaving the text side and the loop eager.
    Returns the number of blocks compiled."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise SemrouteError(f"{type(model).__name__} has no `blocks` to compile")
    import torch._dynamo

    # One graph per (text bucket, latent bucket, grad mode): allow more than the default few before
    # dynamo falls back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)
