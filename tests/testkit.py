"""Test kit: tiny random LLMs with a real (trained-on-the-spot) byte-level BPE tokenizer, saved to a folder and
loaded back through the same ``from_pretrained`` path a user's model takes; manifest writers; a CLI runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

WORDS = (
    "a an the one two three four red green blue yellow purple orange black white circle square triangle "
    "star cross ring big small large tiny left right above below next to of on in and with photo image "
    "describe this picture showing dog cat car tree house sky"
).split()

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "cli.py"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|end|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + ["Describe this image."] * 5
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llm(folder: Path, arch: str = "llama", *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random causal LM (``llama`` or ``qwen3``, the latter with q/k norms) plus tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tok = make_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // 4, **common))
    else:
        raise ValueError(arch)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_manifest(path: Path, records: list[dict], fmt: str = "jsonl") -> Path:
    if fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def random_captions(n: int, seed: int = 0, max_words: int = 24) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
                 for _ in range(rng.choice([1, 1, 2]))]
        out.append({"image": f"img/{i}.png", "text": texts if len(texts) > 1 else texts[0]})
    return out


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600):
    """Run ``python cli.py ARGS`` in a subprocess (the way a user from a checkout would)."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def die_on_call(monkeypatch, owner, name: str, n: int) -> list:
    """Make ``owner.name`` (a method) raise ``RuntimeError("killed")`` on its ``n``-th call, as a process killed
    mid-run would stop; the earlier calls run for real. Returns the list of each call's first argument."""
    real, calls = getattr(owner, name), []

    def dying(self, first, *args, **kwargs):
        calls.append(first)
        if len(calls) == n:
            raise RuntimeError("killed")
        return real(self, first, *args, **kwargs)

    monkeypatch.setattr(owner, name, dying)
    return calls


COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 40, 220), "yellow": (230, 210, 20)}


def write_square_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """``n`` images of one colored square on the left or right, captioned accordingly (with a second
    wording for every third image), as manifest records."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        color = rng.choice(list(COLORS))
        left = rng.random() < 0.5
        img = Image.new("RGB", (size, size), (255, 255, 255))
        x = size // 8 if left else size // 2 + size // 16
        y = size // 3
        ImageDraw.Draw(img).rectangle([x, y, x + size // 3, y + size // 3], fill=COLORS[color])
        path = folder / f"{i:04d}.png"
        img.save(path)
        side = "left" if left else "right"
        text = f" a {color} square on the {side}"
        records.append({"image": str(path), "text": [text, f" one {color} square, {side}"] if i % 3 == 0 else text})
    return records


# -- DiT tests (test_dit.py, test_deep_fusion.py, test_dit_contract.py) -----------------------------
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable parameter off its init (a deep-fusion DiT's frozen LLM weights stay): zero-initialised
    outputs and gates would hide most bugs."""
    gen = torch.Generator().manual_seed(seed)
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def text_batch(model, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random features ``[B, max_len, L, D]`` (zeros in padding, as a loader pads) and the mask
    ``[B, max_len]``, for a DiT reading ``L = len(model.text_layers)`` layers of width ``model.config.text_dim``."""
    gen = torch.Generator().manual_seed(seed)
    T, L, D = max(lengths), len(model.text_layers), model.config.text_dim
    features, mask = torch.zeros(len(lengths), T, L, D), torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        features[i, :n] = torch.randn(n, L, D, generator=gen)
        mask[i, :n] = True
    return features, mask


# -- runs and processes -----------------------------------------------------------------------------
def train_config(caches, out: Path, **kw):
    """A ``tiny``/``static`` TrainConfig on ``caches`` (the ``square_caches`` fixture): 4 steps of batch 8,
    checkpoints every 2, no tracker; ``kw`` overrides."""
    from semroute.stage2_train.config import TrainConfig

    text, latents = caches[:2]
    base = dict(text_cache=text, latent_cache=latents, out=str(out), preset="tiny", fusion="static", batch_size=8,
                num_workers=0, report_to="none", log_every=1, checkpoint_every=2, max_steps=4, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a run folder (``tmp_path/run``) for a test that changes or damages it."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# What a Python started by a test runs first: ``semroute`` imported from this checkout (as conftest.py does).
CHECKOUT_PRELUDE = f"""import importlib.util, sys
_spec = importlib.util.spec_from_file_location("semroute", {str(REPO / '__init__.py')!r},
                                               submodule_search_locations=[{str(REPO)!r}])
_mod = importlib.util.module_from_spec(_spec); sys.modules["semroute"] = _mod; _spec.loader.exec_module(_mod)
"""


def hold_lock(import_line: str, lock_expr: str):
    """Another process that takes ``lock_expr`` (after ``import_line``) and holds it until it is killed;
    returned once it holds it. The caller kills and waits for it."""
    import subprocess

    code = CHECKOUT_PRELUDE + f"{import_line}\nimport time\nlock = {lock_expr}.acquire()\nprint('held', flush=True)\n" \
                              "time.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file of ``(member name, bytes)``, in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# Started in each process of a launch (through PYTHONPATH, as sitecustomize): leaves a file in
# $SEMROUTE_TEST_TEARDOWN when the process frees a Trainer or exits through the interpreter's teardown.
_TEARDOWN_HOOK = """
import atexit, os, sys
if sys.argv and sys.argv[0].endswith("cli.py"):
    _marks = os.environ["SEMROUTE_TEST_TEARDOWN"]

    def _mark(what, _os=os, _pid=os.getpid()):  # (bound now: also during the interpreter's exit)
        _os.close(_os.open(_os.path.join(_marks, f"{what}-{_pid}"), _os.O_CREAT | _os.O_WRONLY))

    atexit.register(_mark, "exit")
    if "train" in sys.argv:
        from semroute.stage2_train.train import Trainer

        Trainer.__del__ = lambda self: _mark("trainer-freed")
"""


def teardown_marks(tmp_path: Path) -> tuple[dict, Path]:
    """Environment for a launched CLI whose processes mark a freed Trainer and an exit through the interpreter's
    teardown (freeing the process group there can hang: shared/processes.py), and the folder of the marks."""
    hook, marks = tmp_path / "teardown-hook", tmp_path / "teardown-marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(_TEARDOWN_HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath, "SEMROUTE_TEST_TEARDOWN": str(marks)}, marks
