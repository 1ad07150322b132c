"""Reading what the deep-fusion DiT needs from a frozen LLM, without running (or, for safetensors, loading) it.

``DeepFusionDiT`` computes the text keys/values of LLM decoder layers ``first .. first + blocks - 1`` from
their cached input hidden states. For that it needs, per paired layer, only four or five tensors

    input_layernorm.weight, self_attn.k_proj.{weight,bias?}, self_attn.v_proj.{weight,bias?}, self_attn.k_norm.weight?

plus the attention shape and rotary frequencies from the LLM's config. ``open_llm`` reads exactly those:

- a local folder or hub id with ``*.safetensors`` weights: ``safetensors.safe_open`` on the needed keys
  only (a 4B LLM's paired layers are ~3% of its bytes), config via ``AutoConfig``;
- a ``.gguf`` file, ``smollm2``, a folder without safetensors, or an already loaded ``LoadedLLM``:
  the LLM is loaded through ``shared.llm.load_llm`` (transformers dequantizes GGUF whole, there is no
  partial reader) and the tensors are taken from its decoder layers.

The LLM identity (``ref`` and weights sha256) is computed exactly as ``shared.llm.load_llm`` computes it
for the text cache's fingerprint, so training can compare the two.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semroute.shared.checks import read_json_object
from semroute.shared.errors import SemrouteError
from semroute.shared.fingerprint import folder_weights_sha256
from semroute.shared.llm import LoadedLLM, resolve_llm_ref, load_llm

# Decoder layers whose attention is "RMSNorm -> k/v projections (-> per-head k RMSNorm) -> rotate-half RoPE"
# with an RMSNorm of the form ``weight * normalized``: what ``LLMTextKV`` reimplements. Others (Gemma's
# ``1 + weight`` norm, OLMo2's whole-projection k norm, SmolLM3's layers without RoPE) would silently give
# different keys, so they are refused.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text",
)
# RoPE variants whose frequencies depend on the sequence length cannot be fixed once per model.
_SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")

# Per-layer tensors the text side reads, named relative to a decoder layer (as in the LLM's state dict).
REQUIRED_SUFFIXES = ("input_layernorm.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
OPTIONAL_SUFFIXES = ("self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.k_norm.weight")


@dataclass
class LLMSource:
    """An LLM opened for reading its paired layers.

    Attributes:
        text_config: the transformers config of the text decoder (a VLM's text tower config).
        ref: the reference the user gave (goes into the model config and is compared with the cache).
        weights_sha256: as ``shared.llm.load_llm`` computes it (None for a hand-made ``LoadedLLM`` without identity).
        read_layers: ``read_layers([k, ...]) -> {k: {suffix: tensor}}`` for decoder layer indices ``k``.
    """

    text_config: object
    ref: str
    weights_sha256: str | None
    read_layers: object = field(repr=False)

    def attention_fields(self) -> dict:
        """``DeepFusionDiT`` config fields describing the LLM's attention (shape, norms, rotary frequencies)."""
        cfg = self.text_config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SemrouteError(
                f"--fusion deep reimplements the text keys/values of Llama/Qwen-style decoder layers; "
                f"{self.ref} is a {model_type!r} model. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        fields = dict(
            text_dim=int(cfg.hidden_size),
            llm_num_layers=int(cfg.num_hidden_layers),
            llm_num_heads=heads,
            llm_num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            llm_head_dim=head_dim,
            llm_norm_eps=float(cfg.rms_norm_eps),
            llm_rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
            llm_rope_inv_freq=None,
            llm_rope_scaling=1.0,
            llm_model_type=model_type,
            llm_ref=self.ref,
            llm_weights_sha256=self.weights_sha256,
        )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise SemrouteError(f"{self.ref}: partial rotary embeddings are not supported by --fusion deep")
        if rope_type in _SEQUENCE_DEPENDENT_ROPE:
            raise SemrouteError(
                f"{self.ref} uses {rope_type!r} RoPE, whose frequencies change with the sequence length; "
                "--fusion deep needs fixed frequencies (default, linear, llama3, yarn, ...)."
            )
        if rope_type != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            # The LLM's own frequency computation, stored as numbers so that loading the DiT needs no LLM config.
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg)
            fields.update(llm_rope_inv_freq=inv_freq.float().tolist(), llm_rope_scaling=float(scaling))
        return fields


def open_llm(llm: str | LoadedLLM) -> LLMSource:
    """Open an LLM reference (folder, hub id, ``.gguf``, ``smollm2``) or a loaded LLM for ``read_layers``."""
    if isinstance(llm, LoadedLLM):
        return _from_loaded(llm)
    kind, folder, gguf_file, _ = resolve_llm_ref(llm)
    if kind == "gguf" or not list(folder.glob("*.safetensors")):
        return _from_loaded(load_llm(llm, device="cpu", dtype="float32"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    text_config = config.get_text_config()
    return LLMSource(
        text_config=text_config,
        ref=llm,
        weights_sha256=folder_weights_sha256(folder),
        read_layers=lambda layers: _read_safetensors(folder, layers, int(text_config.num_hidden_layers)),
    )


def _from_loaded(llm: LoadedLLM) -> LLMSource:
    decoder_layers = getattr(llm.decoder, "layers", None)
    if decoder_layers is None:
        raise SemrouteError(f"{llm.ref}: its decoder ({type(llm.decoder).__name__}) has no `layers` list to pair with DiT blocks")

    def read(layers: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        out = {}
        for k in layers:
            state = decoder_layers[k].state_dict()
            out[k] = {s: state[s].detach().clone() for s in REQUIRED_SUFFIXES + OPTIONAL_SUFFIXES if s in state}
        return out

    return LLMSource(
        text_config=llm.decoder.config, ref=llm.ref, weights_sha256=llm.identity.get("weights_sha256"), read_layers=read
    )


def _read_safetensors(folder: Path, layers: Sequence[int], num_layers: int) -> dict[int, dict[str, torch.Tensor]]:
    """The needed tensors of decoder ``layers``, read key by key from the folder's safetensors files."""
    from safetensors import safe_open

    key_to_file = _safetensors_key_map(folder)
    prefix = _decoder_prefix(key_to_file, num_layers, folder)
    out: dict[int, dict[str, torch.Tensor]] = {}
    handles: dict[str, object] = {}
    try:
        for k in layers:
            out[k] = {}
            for suffix in REQUIRED_SUFFIXES + OPTIONAL_SUFFIXES:
                key = f"{prefix}{k}.{suffix}"
                if key not in key_to_file:
                    if suffix in REQUIRED_SUFFIXES:
                        raise SemrouteError(f"{folder}: tensor {key} is missing; cannot build the text keys/values of layer {k}")
                    continue
                name = key_to_file[key]
                if name not in handles:
                    handles[name] = safe_open(str(folder / name), framework="pt")
                out[k][suffix] = handles[name].get_tensor(key)
    finally:
        handles.clear()
    return out


def _safetensors_key_map(folder: Path) -> dict[str, str]:
    """tensor name -> file name (no tensor is read), in transformers' order of precedence:
    ``model.safetensors``, then the shard index, then any ``*.safetensors``."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").exists() and index.exists():
        fix = "restore the LLM's folder (a hub download: delete it from the Hugging Face cache to fetch it again)"
        weight_map = read_json_object(index, fix).get("weight_map")
        if not isinstance(weight_map, dict):
            raise SemrouteError(f"{index}: no weight_map object (tensor name -> file); {fix}")
        return dict(weight_map)
    single = folder / "model.safetensors"
    key_to_file = {}
    for path in [single] if single.exists() else sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            key_to_file.update(dict.fromkeys(fh.keys(), path.name))
    return key_to_file


_LAYER_KEY = re.compile(r"^(.*layers\.)(\d+)\.self_attn\.k_proj\.weight$")


def _decoder_prefix(key_to_file: dict[str, str], num_layers: int, folder: Path) -> str:
    """The key prefix of the text decoder's layers (``model.layers.``, ``model.language_model.layers.``, ...).

    A VLM checkpoint may hold a vision tower with layers too; the text decoder is the stack with
    ``num_hidden_layers`` layers, preferring a ``language_model``/``text`` prefix when several fit.
    """
    counts: dict[str, int] = {}
    for key in key_to_file:
        match = _LAYER_KEY.match(key)
        if match:
            counts[match[1]] = counts.get(match[1], 0) + 1
    fits = [p for p, n in counts.items() if n == num_layers]
    if len(fits) > 1:
        fits = [p for p in fits if "language_model" in p or "text" in p] or fits
    if len(fits) != 1:
        raise SemrouteError(
            f"{folder}: cannot tell which layer stack is the {num_layers}-layer text decoder "
            f"(candidates: {sorted(counts) or 'none'})"
        )
    return fits[0]
