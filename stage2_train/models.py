"""The model registry: which DiT class implements each ``fusion``, how training builds one for its caches,
and how a saved model folder is loaded back.

Every routing strategy of ``fusion.FUSIONS`` is a :class:`~semroute.stage2_train.dit.SemrouteDiT`; ``deep``
(FuseDiT-style deep fusion) is a :class:`~semroute.stage2_train.deep_fusion.DeepFusionDiT`. The classes are
named here as strings so that reading the registry (config validation, ``info``) imports no model code.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from semroute.shared.checks import BadValue, check_bool, check_number, read_json_object
from semroute.shared.errors import SemrouteError, first_line
from semroute.shared.layers import parse_layers
from semroute.stage2_train.fusion import FUSIONS, default_text_layers

_DIT = "semroute.stage2_train.dit:SemrouteDiT"
_DEEP = "semroute.stage2_train.deep_fusion:DeepFusionDiT"

MODELS: dict[str, str] = {**{name: _DIT for name in FUSIONS}, "deep": _DEEP}
"""``fusion`` name -> ``module:Class`` of the DiT that implements it."""


def check_fusion(name: str, key: str = "fusion") -> None:
    """A ``BadValue`` under ``key`` (``TrainConfig.build`` names it by the flag or ``--set`` it came from)."""
    if name not in MODELS:
        raise BadValue(key, f"{name!r} is unknown; choose one of {', '.join(MODELS)}")


def model_class(fusion: str) -> type:
    """The DiT class implementing ``fusion``."""
    check_fusion(fusion)
    module, name = MODELS[fusion].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(model_dir: Path):
    """A DiT saved with ``save_pretrained`` (a checkpoint's ``model/`` or a pipeline's ``transformer/``)."""
    model_dir = Path(model_dir)
    file = model_dir / "config.json"
    if not file.exists():
        raise SemrouteError(f"{model_dir} holds no model (config.json missing)")
    config = read_json_object(file, "the model folder is damaged: use another checkpoint, or export the pipeline again")
    fusion = config.get("fusion", "depth")
    if not isinstance(fusion, str):
        raise SemrouteError(f"{file}: fusion is {json.dumps(fusion)}, not a name; the model folder is damaged: use "
                            "another checkpoint, or export the pipeline again")
    klass = model_class(fusion)
    if klass.__name__ != config.get("_class_name", klass.__name__):
        raise SemrouteError(f"{model_dir}/config.json: class {config['_class_name']} does not implement fusion "
                            f"{config.get('fusion')!r} ({klass.__name__} does)")
    try:
        # local_files_only: a folder gone missing must not turn into a hub lookup of its path
        return klass.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        if not model_dir.is_dir():  # removed since config.json was read: a live run prunes old checkpoints
            raise SemrouteError(f"{model_dir} was removed while it was being read (a run still training keeps "
                                "only its newest checkpoints); run the command again") from None
        # diffusers' error for a weights file that is gone or unreadable; complete.json, where there is one, was
        # checked before this (stage2_train/checkpoint_files.py)
        raise SemrouteError(f"{model_dir}: cannot load the model ({first_line(err)}); the model folder is damaged: "
                            "use another checkpoint, or export the pipeline again") from None


# ---------------------------------------------------------------------------------------------
# Building a model for training, sized by the caches
# ---------------------------------------------------------------------------------------------
def model_text_layers(cfg, n_llm_layers: int, stored: list[int]) -> list[int]:
    if cfg.text_layers is not None:
        return parse_layers(cfg.text_layers, n_llm_layers)
    return default_text_layers(cfg.fusion, n_llm_layers, stored)


def check_model_overrides(klass: type, overrides: dict, preset: str) -> dict:
    """The ``model.*`` keys a config sets, checked against the DiT class's own settings (their defaults' types:
    sizes are whole numbers >= 1, floats finite and >= 0), so that a typo or a wrong type is named here rather
    than surfacing as a TypeError inside the constructor. Returns them as numbers of the right type."""
    from semroute.stage2_train.presets import PRESETS

    params = inspect.signature(klass.__init__).parameters
    checked = {}
    for key, value in overrides.items():
        if key in ("fusion", "text_layers"):
            raise SemrouteError(f"model.{key}: set the top-level key {key} instead (--set {key}=...)")
        if key not in params or key == "self":
            raise SemrouteError(f"model.{key} is not a setting of {klass.__name__}; its settings are: "
                                + ", ".join(k for k in params if k not in ("self", "fusion", "text_layers")))
        default = params[key].default
        if isinstance(default, bool):
            checked[key] = check_bool(f"model.{key}", value)
        elif isinstance(default, int):
            checked[key] = check_number(f"model.{key}", value, integer=True, low=1)
        elif isinstance(default, float):
            checked[key] = check_number(f"model.{key}", value, low=0.0)
    shape = {**PRESETS.get(preset, {}), **checked}
    if "num_kv_heads" in params and shape.get("num_heads", 1) % shape.get("num_kv_heads", 1):
        raise SemrouteError(f"model.num_heads ({shape['num_heads']}) must be a multiple of model.num_kv_heads "
                            f"({shape['num_kv_heads']}): each key/value head serves a group of query heads")
    return checked


def build_model(cfg, text_fp: dict, stored_layers: list[int], latent_channels: int):
    """The DiT for a training config (``TrainConfig``), sized on the text side by the cache's LLM."""
    n, d = int(text_fp["llm_num_hidden_layers"]), int(text_fp["llm_hidden_size"])
    overrides = dict(cfg.model)
    for key, value in (("text_dim", d), ("llm_num_layers", n)):
        if key in overrides and overrides[key] != value:
            raise SemrouteError(f"model.{key}={overrides[key]} but the text cache's LLM has {key}={value}")
        overrides[key] = value
    overrides.setdefault("in_channels", latent_channels)
    if overrides["in_channels"] != latent_channels:
        raise SemrouteError(f"model.in_channels={overrides['in_channels']} but the latent cache has "
                            f"{latent_channels} channels")
    klass = model_class(cfg.fusion)
    overrides.update(check_model_overrides(klass, cfg.model, cfg.preset))
    if cfg.fusion == "deep":
        from semroute.stage2_train.deep_fusion import build_deep_model

        return build_deep_model(cfg, text_fp, stored_layers, overrides)
    layers = model_text_layers(cfg, n, stored_layers)
    model = klass.from_preset(cfg.preset, fusion=cfg.fusion, text_layers=layers, **overrides)
    model.layer_positions(stored_layers)  # a clear error when the cache lacks a layer
    return model
