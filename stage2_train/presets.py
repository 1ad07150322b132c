"""Named DiT sizes: ``SemrouteDiT.from_preset(name, **overrides)``.

The text-side fields (``text_dim``, ``llm_num_layers``, ``text_layers``) describe the LLM whose cache
the model reads; they are defaults for the LLM the preset is usually paired with and are meant to be
overridden from the cache's fingerprint. ``in_channels`` likewise follows the image codec: 16 for a
FLUX-like VAE, 4 for the SD VAE, ``3 * p * p`` for the pixel codec with space-to-depth patch ``p``.
"""

from __future__ import annotations

# SmolLM2-135M-Instruct: 30 decoder layers of width 576 (the demo's LLM).
_SMOLLM2 = {"text_dim": 576, "llm_num_layers": 30}
# Qwen3-VL-4B text tower: 36 decoder layers of width 2560 (the paper's LLM).
_QWEN3_VL_4B = {"text_dim": 2560, "llm_num_layers": 36}

PRESETS: dict[str, dict] = {
    # Unit tests: milliseconds per forward on a CPU.
    "tiny": dict(
        in_channels=4, num_blocks=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_hidden_size=128, text_dim=32, llm_num_layers=4, gate_embed_dim=16, gate_hidden_dim=32,
    ),
    # CPU demo: trains for minutes on 2 cores. Default channels: the pixel codec with p=2 on 32x32 RGB
    # images gives 12 x 16 x 16 inputs, i.e. 64 image tokens after the DiT's own patch 2.
    "small": dict(
        in_channels=12, num_blocks=6, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_hidden_size=768, **_SMOLLM2,
    ),
    # A mid-size GPU model for real VAEs and LLMs (about a tenth of the paper's parameters).
    "base": dict(
        in_channels=16, num_blocks=16, hidden_size=1024, num_heads=16, num_kv_heads=4, head_dim=64,
        mlp_hidden_size=4096, **_QWEN3_VL_4B,
    ),
    # The reference study's scale: 24 blocks, hidden 2048, 32 query / 8 KV heads of 128, SwiGLU 8192,
    # 16-channel VAE latents, Qwen3-VL-4B text (36 layers x 2560).
    "paper": dict(
        in_channels=16, num_blocks=24, hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_hidden_size=8192, **_QWEN3_VL_4B,
    ),
}
