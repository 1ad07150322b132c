"""The deep-fusion baseline (FuseDiT, docs/method.md) as a diffusers model: ``--fusion deep``.

DiT block i attends jointly over its own image tokens and the keys/values of LLM decoder layer ``first + i``,
projected by that frozen LLM layer's own attention weights:

    hidden_states[first + i]  [B, T, D_llm]     cached; the *input* of decoder module ``layers[first + i]``
      --input_layernorm, k_proj / v_proj, (k_norm), 1D RoPE-->  text K/V [B, nkv, T, hd]      (frozen, no grad)
    image tokens x [B, N, hidden]
      --RMSNorm, to_q / to_k / to_v, QK-norm, 2D RoPE-->        image Q/K/V in the LLM's head layout (trained)
    block i:  x += to_out(attn(Q_img, [K_text; K_img], [V_text; V_img]));   x += SwiGLU(RMSNorm(x))

Why only the text keys/values: in the joint sequence text attends causally to text only and never to image
tokens, so the text stream of layer ``first + i`` computes exactly what the LLM computed; its outputs are the
LLM's next hidden states, which the cache already holds. The DiT side therefore needs no text queries, text
output projection or text MLP, and never runs the LLM: each paired layer's keys/values are a function of the
cached hidden state and four or five frozen tensors. ``prepare_text`` computes them once per prompt for all
blocks, and a sampler reuses them across steps.

Positions: text token j gets position j on every rotary frequency band, exactly as in the LLM (texts are
right-padded, so real tokens sit at 0..len-1). The image token at patch row r, column c of sample b gets 2D
positions after *that sample's real text* (token (0, 0) sits at ``len_b``, the next position after the text).
With ``image_rope="interleaved"`` (ours) the LLM's frequency bands are used as they are, even bands rotating
with ``len_b + r`` and odd bands with ``len_b + c`` (so both axes see high and low frequencies, like Qwen3-VL's
interleaved M-RoPE). With ``image_rope="reference"`` one set of head_dim/4 frequencies theta^(-4j/head_dim)
serves both axes, laid out as [row bands | column bands], as the reference does. Offsetting by the real length
rather than the padded length keeps every image-text and image-image offset independent of padding, so a
caption's output does not depend on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from semroute.shared.errors import SemrouteError
from semroute.shared.fingerprint import require_match
from semroute.stage2_train.deep_attention import (
    IMAGE_ROPES,
    DeepFusionBlock,
    LLMTextKV,
    default_inv_freq,
    image_inv_freq,
    image_positions,
    rope_cos_sin,
)
from semroute.stage2_train.fusion import resolve_layer_indices
from semroute.stage2_train.dit_base import DiTBase
from semroute.stage2_train.presets import PRESETS

FROZEN_PREFIX = "llm_layers."  # parameter names of the frozen LLM weights


def default_first_layer(num_blocks: int, llm_num_layers: int) -> int:
    """Centre the paired layers in the LLM: 24 blocks on a 36-layer LLM give layers 6..29, as the reference."""
    return (llm_num_layers - num_blocks) // 2


def check_pairing(first: int, num_blocks: int, llm_num_layers: int) -> None:
    """Block i reads the input of decoder layer ``first + i``, which must exist: ``0 <= first``, ``first + blocks <= N``."""
    if first < 0 or first + num_blocks > llm_num_layers:
        fix = (f"Use 0 <= first <= {llm_num_layers - num_blocks} or fewer blocks." if num_blocks <= llm_num_layers
               else f"Use at most {llm_num_layers} blocks.")
        raise SemrouteError(
            f"--fusion deep pairs DiT block i with LLM decoder layer first + i; first={first} with {num_blocks} blocks "
            f"needs layers {first}..{first + num_blocks - 1}, but the LLM has layers 0..{llm_num_layers - 1}. {fix}"
        )


@dataclass
class DeepTextContext:
    """A batch of prompts ready for ``DeepFusionDiT``; build with ``prepare_text``, reuse across sampling steps.

    Attributes:
        mask: ``[B, T]`` bool, True for real tokens (a prefix of each row: right padding).
        lengths: ``[B]`` long, real tokens per prompt (the image position offset).
        kv: per block ``(key, value)``, each ``[B, llm_num_kv_heads, T, llm_head_dim]`` (post-RoPE keys).
    """

    mask: torch.Tensor
    lengths: torch.Tensor
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DeepFusionDiT(DiTBase):
    """FuseDiT-style deep fusion: DiT block i attends jointly to its image tokens and LLM layer ``first + i``.

    Same call interface as ``SemrouteDiT`` (``forward``, ``prepare_text``, ``layer_positions``,
    ``routing_weights``). Build from an LLM with ``from_llm`` (reads only the paired layers' attention
    weights) or, with random stand-in LLM weights, ``from_preset``.

    Args:
        in_channels, patch_size, num_blocks, hidden_size, mlp_hidden_size, norm_eps, adaln: the DiT, as in ``SemrouteDiT``.
        text_dim: the LLM's hidden size. llm_num_layers: its decoder layer count N.
        llm_first_layer: ``first``; block i reads ``hidden_states[first + i]`` (the input of decoder layer
            ``first + i``). Default: centred, ``(N - num_blocks) // 2`` (6 for 24 blocks on 36 layers).
        llm_num_heads, llm_num_kv_heads, llm_head_dim: the LLM's attention layout, used by the image side too.
        llm_norm_eps: the LLM's RMSNorm eps. llm_qk_norm: the LLM has a per-head ``k_norm`` (Qwen3).
        llm_attention_bias: the LLM's k/v projections have biases (Qwen2).
        llm_rope_theta: the LLM's RoPE base; llm_rope_inv_freq: its inverse frequencies when not the
            default formula of theta (llama3, yarn, ...); llm_rope_scaling: its cos/sin attention scaling.
        llm_model_type, llm_ref, llm_weights_sha256: the LLM's identity, compared with a text cache's fingerprint.
        image_rope: how the image tokens' 2D positions use the rotary bands: ``interleaved`` (ours: the LLM's
            frequencies, rows on even bands, columns on odd ones) or ``reference`` (theta^(-4j/head_dim) on both
            axes as [row bands | column bands]); see ``deep_attention.IMAGE_ROPES``.
        fusion: always ``"deep"`` (kept in the config so that loaders can dispatch on it).
        text_layers: derived, ``first .. first + blocks - 1``; accepted only if it equals that.

    Attributes:
        llm_layers: ``LLMTextKV`` per block, frozen (``requires_grad=False``; see ``trainable_parameters``).
        text_layers: the ``hidden_states`` indices the model reads, in block order.
    """

    _no_split_modules = ["DeepFusionBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: int = 2,
        num_blocks: int = 24,
        hidden_size: int = 2048,
        mlp_hidden_size: int = 8192,
        text_dim: int = 2560,
        llm_num_layers: int = 36,
        llm_first_layer: int | None = None,
        llm_num_heads: int = 32,
        llm_num_kv_heads: int = 8,
        llm_head_dim: int = 128,
        llm_norm_eps: float = 1e-6,
        llm_qk_norm: bool = True,
        llm_attention_bias: bool = False,
        llm_rope_theta: float = 5_000_000.0,  # Qwen3-VL-4B
        llm_rope_inv_freq: list[float] | None = None,
        llm_rope_scaling: float = 1.0,
        llm_model_type: str = "qwen3_vl_text",
        llm_ref: str | None = None,
        llm_weights_sha256: str | None = None,
        fusion: str = "deep",
        text_layers: list[int] | None = None,
        norm_eps: float = 1e-6,
        adaln: bool = False,
        image_rope: str = "interleaved",
    ):
        super().__init__()
        if image_rope not in IMAGE_ROPES:
            raise SemrouteError(f"image_rope {image_rope!r} is unknown; choose one of {', '.join(IMAGE_ROPES)}")
        if fusion != "deep":
            raise SemrouteError(f"DeepFusionDiT implements --fusion deep only, got {fusion!r}; use SemrouteDiT for the others.")
        first = default_first_layer(num_blocks, llm_num_layers) if llm_first_layer is None else int(llm_first_layer)
        check_pairing(first, num_blocks, llm_num_layers)
        self.text_layers = list(range(first, first + num_blocks))
        if text_layers is not None and list(text_layers) != self.text_layers:
            raise SemrouteError(
                f"--fusion deep reads hidden_states[first + i] for each block i, i.e. {self.text_layers} with "
                f"first={first}; got text_layers={list(text_layers)}. Set llm_first_layer instead."
            )
        self.register_to_config(llm_first_layer=first, text_layers=self.text_layers)
        inv_freq = default_inv_freq(llm_rope_theta, llm_head_dim) if llm_rope_inv_freq is None else torch.tensor(llm_rope_inv_freq, dtype=torch.float32)
        if 2 * len(inv_freq) != llm_head_dim or len(inv_freq) < 2 or len(inv_freq) % 2:
            raise SemrouteError(f"llm_rope_inv_freq needs head_dim / 2 = {llm_head_dim // 2} bands (even, >= 2), got {len(inv_freq)}")
        # Plain attributes, not buffers: stay fp32 when the model is cast to bf16, and the config determines them.
        self._inv_freq = inv_freq  # [R] text bands
        self._image_inv_freq = image_inv_freq(inv_freq, image_rope)  # [R] image bands

        # 1. Text side: the paired LLM layers' key/value paths, frozen.
        self.llm_layers = nn.ModuleList(
            LLMTextKV(text_dim, llm_num_kv_heads, llm_head_dim, llm_norm_eps, llm_qk_norm, llm_attention_bias)
            for _ in range(num_blocks)
        )
        self.llm_layers.requires_grad_(False)

        # 2. Image side: patch embedding, optional adaLN timestep embedding, output head; the blocks.
        self.build_dit(in_channels, patch_size, hidden_size, norm_eps, adaln, num_blocks, lambda: DeepFusionBlock(
            hidden_size, llm_num_heads, llm_num_kv_heads, llm_head_dim, mlp_hidden_size, norm_eps, adaln))

    # ----------------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------------

    @classmethod
    def preset_fields(cls, preset: dict) -> dict:
        """``from_preset`` builds with random stand-in LLM weights (tests, benchmarks): the preset's
        ``num_heads``/``num_kv_heads``/``head_dim`` become the LLM attention layout (``paper``: 32/8 of 128,
        Qwen3-VL-4B's); its sigma-gate sizes are unused."""
        preset = {k: v for k, v in preset.items() if k not in ("gate_embed_dim", "gate_hidden_dim")}
        for dit_key in ("num_heads", "num_kv_heads", "head_dim"):
            preset[f"llm_{dit_key}"] = preset.pop(dit_key)
        return preset

    @classmethod
    def from_llm(cls, llm, *, preset: str = "small", first: int | None = None, **overrides) -> DeepFusionDiT:
        """Build for an LLM, copying the paired layers' frozen attention weights; the LLM is never run.

        Args:
            llm: a ``--llm`` reference (model folder, hub id, ``.gguf`` file, ``smollm2``) or a ``LoadedLLM``.
                Safetensors folders are read tensor by tensor; GGUF files are loaded whole (see ``llm_layers``).
            preset: DiT size (``tiny``, ``small``, ``base``, ``paper``); the attention layout comes from the LLM.
            first: the LLM layer paired with block 0 (default centred, see ``default_first_layer``).
            overrides: any other config field (``in_channels``, ``num_blocks``, ``adaln``, ...).
        """
        from semroute.stage2_train.llm_layers import open_llm

        source = open_llm(llm)
        fields = source.attention_fields()
        num_blocks = overrides.get("num_blocks", PRESETS.get(preset, {}).get("num_blocks"))
        if num_blocks is None:
            raise SemrouteError(f"Unknown DiT preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
        first = default_first_layer(num_blocks, fields["llm_num_layers"]) if first is None else first
        check_pairing(first, num_blocks, fields["llm_num_layers"])
        tensors = source.read_layers(range(first, first + num_blocks))
        fields.update(
            llm_first_layer=first,
            llm_qk_norm="self_attn.k_norm.weight" in tensors[first],
            llm_attention_bias="self_attn.k_proj.bias" in tensors[first],
        )
        model = cls.from_preset(preset, **{**fields, **overrides})
        model.load_llm_layers(tensors)
        return model

    def load_llm_layers(self, tensors: dict[int, dict[str, torch.Tensor]]) -> None:
        """Copy decoder layer k's tensors (``{k: {"input_layernorm.weight": ..., "self_attn.k_proj.weight": ...}}``,
        named as in the LLM's layer state dict) into the block paired with k; every tensor must fit."""
        for index, layer in zip(self.text_layers, self.llm_layers):
            given = tensors.get(index)
            if given is None:
                raise SemrouteError(f"no weights given for LLM decoder layer {index} (paired with block {index - self.text_layers[0]})")
            state = layer.state_dict()
            if set(given) != set(state):
                raise SemrouteError(f"LLM decoder layer {index}: got tensors {sorted(given)}, the model expects {sorted(state)}")
            for name, value in given.items():
                if value.shape != state[name].shape:
                    raise SemrouteError(f"LLM decoder layer {index}: {name} has shape {list(value.shape)}, expected {list(state[name].shape)}")
            layer.load_state_dict(given)

    def initialize_weights(self) -> None:
        """Xavier-uniform DiT Linears, zero biases, zero output projection and adaLN modulations; the frozen LLM
        layers get transformers' init (normal 0.02, unit norms) as stand-ins until real weights are loaded."""
        self.init_linears(stand_ins=FROZEN_PREFIX)
        self.zero_init_outputs()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except the frozen LLM weights (``llm_layers.*``), whatever their ``requires_grad``."""
        return (p for name, p in self.named_parameters() if not name.startswith(FROZEN_PREFIX))

    # ----------------------------------------------------------------------------------------------
    # Cache compatibility
    # ----------------------------------------------------------------------------------------------

    def layer_positions(self, stored_layers: Sequence[int]) -> list[int]:
        """Positions in a text cache storing ``stored_layers`` (hidden_states indices) of ``text_layers``, in block order.

        Raises a ``SemrouteError`` naming the missing layers when the cache lacks some.
        """
        stored = resolve_layer_indices(stored_layers, self.config.llm_num_layers)
        missing = [layer for layer in self.text_layers if layer not in stored]
        if missing:
            first, last = self.text_layers[0], self.text_layers[-1]
            raise SemrouteError(
                f"--fusion deep pairs its {len(self.text_layers)} blocks with hidden_states {first}..{last} (the inputs of "
                f"decoder layers {first}..{last}), but the text cache stores {stored}; missing: {missing}. "
                f"Re-encode with `semroute encode-text --layers {first}-{last}`"
                + ("" if first == 0 else " (or a superset such as `--layers all`)")  # `all` starts at 1
                + ", or change llm_first_layer."
            )
        return [stored.index(layer) for layer in self.text_layers]

    def check_text_cache(self, fingerprint: dict) -> list[int]:
        """Refuse a text cache from another LLM (or lacking the paired layers); return ``layer_positions``.

        ``fingerprint``: the cache's (``TextCacheReader.fingerprint``): ``llm_weights_sha256``,
        ``llm_num_hidden_layers``, ``llm_hidden_size``, ``layers``.
        """
        want = {"llm_num_hidden_layers": self.config.llm_num_layers, "llm_hidden_size": self.config.text_dim}
        if self.config.llm_weights_sha256:
            want["llm_weights_sha256"] = self.config.llm_weights_sha256
        require_match(fingerprint, want, None, "The text cache (its LLM against the deep-fusion model's LLM)")
        return self.layer_positions(fingerprint["layers"])

    # ----------------------------------------------------------------------------------------------
    # Text side
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()  # everything upstream of the text K/V is frozen: no graph, no activation memory
    def prepare_text(self, text_features: torch.Tensor, text_mask: torch.Tensor | None = None) -> DeepTextContext:
        """Every block's text keys/values from the cached inputs of the paired LLM layers.

        Args:
            text_features: ``[B, T, blocks, D_llm]`` right-padded cached ``hidden_states`` of ``text_layers`` (any float dtype).
            text_mask: ``[B, T]`` bool, True for real tokens, a prefix of each row; default all True.
        Returns:
            A ``DeepTextContext`` for ``forward(..., text_context=...)``, reusable across sampling steps.
        """
        mask = self.check_text(text_features, text_mask)
        T, device = text_features.shape[1], text_features.device
        lengths = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(T, device=device)[None] < lengths[:, None]):
            raise SemrouteError("--fusion deep needs right-padded text (each mask row True then False): text positions are 0..len-1 as in the LLM")
        # 1D positions 0..T-1 on every band, as the LLM's rotary embedding gives them.
        cos, sin = rope_cos_sin(torch.arange(T, device=device, dtype=torch.float32)[None, :, None],
                                self._inv_freq.to(device), self.config.llm_rope_scaling)  # [1, T, hd]
        dtype = self.llm_layers[0].self_attn.k_proj.weight.dtype
        kv = tuple(layer(text_features[:, :, i].to(dtype), cos, sin) for i, layer in enumerate(self.llm_layers))
        return DeepTextContext(mask=mask, lengths=lengths, kv=kv)

    def image_rope_tables(self, lengths: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)``, each ``[B, h*w, llm_head_dim]`` fp32, of a row-major ``height x width`` image grid
        placed after each prompt's ``lengths`` real tokens, in the band layout of ``image_rope``."""
        inv_freq = self._image_inv_freq.to(lengths.device)
        positions = image_positions(lengths, height, width, len(inv_freq), self.config.image_rope)  # [B, N, R]
        return rope_cos_sin(positions, inv_freq, self.config.llm_rope_scaling)

    # ----------------------------------------------------------------------------------------------
    # Forward (the skeleton is DiTBase.forward) and routing (a fixed pairing, so logs and plots treat
    # every strategy alike)
    # ----------------------------------------------------------------------------------------------

    def block_inputs(self, text_context: DeepTextContext, timestep: torch.Tensor, h: int, w: int, device) -> tuple:
        """The image grid's RoPE after each prompt's real tokens, every block's text keys/values, and the key
        mask of the joint sequence: image queries see the real text tokens and every image token, ``[B, 1, 1, T + N]``."""
        rope = self.image_rope_tables(text_context.lengths, h, w)
        image_keys = torch.ones(len(text_context.lengths), h * w, dtype=torch.bool, device=device)
        attn_mask = torch.cat([text_context.mask, image_keys], dim=1)[:, None, None, :]
        return rope, text_context.kv, attn_mask

    def layer_weights(self, sigma: torch.Tensor | None) -> torch.Tensor:
        """The fixed pairing as one-hot weights over ``text_layers``: ``[blocks, L]``, the identity."""
        return torch.eye(len(self.text_layers))


def build_deep_model(cfg, text_fingerprint: dict, stored_layers: Sequence[int], overrides: dict) -> DeepFusionDiT:
    """The training loop's entry point: a ``DeepFusionDiT`` for a text cache, its LLM weights read from the LLM
    the cache was encoded with (``llm_ref`` of the fingerprint, or ``model.llm_ref`` to point elsewhere).

    Args:
        cfg: the training config; reads ``preset``, ``deep_first_layer`` and (refused if set) ``text_layers``.
        text_fingerprint: the text cache's fingerprint (LLM identity, sizes).
        stored_layers: the layers the cache stores (hidden_states indices).
        overrides: DiT config fields (``in_channels``, ``num_blocks``, ...; ``text_dim``/``llm_num_layers``
            must agree with the LLM).
    Raises:
        SemrouteError / FingerprintMismatch: the LLM is not the cache's, or the cache lacks a paired layer.
    """
    if getattr(cfg, "text_layers", None) is not None:
        raise SemrouteError(
            "--fusion deep reads hidden_states[first + i] for block i; set deep_first_layer instead of text_layers."
        )
    overrides = dict(overrides)
    ref = overrides.pop("llm_ref", None) or text_fingerprint.get("llm_ref")
    if not ref:
        raise SemrouteError("--fusion deep needs the LLM's attention weights, but the text cache names no LLM (llm_ref); set model.llm_ref")
    expected = {key: overrides.pop(key) for key in ("text_dim", "llm_num_layers") if key in overrides}
    model = DeepFusionDiT.from_llm(ref, preset=cfg.preset, first=getattr(cfg, "deep_first_layer", None), **overrides)
    for key, value in expected.items():
        if model.config[key] != value:
            raise SemrouteError(f"model.{key}={value}, but the LLM {ref} has {key}={model.config[key]}")
    model.check_text_cache(text_fingerprint)
    model.layer_positions(stored_layers)
    return model
