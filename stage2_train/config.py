"""The training configuration: one flat dataclass, filled from defaults, then a YAML file, then
command-line flags, then ``--set key=value`` overrides. The resolved config is saved in the run folder.

The dataclass is the one source of truth: each field carries its default and, as its docstring, its help
(``field_help``; the CLI's options show it). Config files hold only what differs from the defaults;
``--config`` takes a file or the name of one under ``configs/`` (``depth-wise``, ``paper/joint``).

Defaults follow the reference study (docs/method.md): rectified flow with logit-normal sigma and
shift 3.0, caption dropout 0.1, AdamW lr 1e-4 / wd 1e-4 (applied to the fusion logits too), grad clip
1.0, bf16 autocast where the hardware has it. ``configs/paper/`` holds the reference's exact runs; the
README's "Differences from the reference" lists where the defaults differ.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from semroute.shared.checks import BadValue, check_bool, check_guidance_interval, check_number
from semroute.shared.errors import SemrouteError
from semroute.shared.files import write_atomic

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
FUSION_CONFIGS = {  # --fusion name -> preset file in configs/
    "penultimate": "penultimate.yaml",
    "uniform": "uniform.yaml",
    "static": "static.yaml",
    "time": "time-wise.yaml",
    "depth": "depth-wise.yaml",
    "joint": "joint.yaml",
    "deep": "deep.yaml",
}
REPORT_TO = ("tensorboard", "wandb", "none")
# What `semroute sample` and the pipeline use when neither the call nor the run's config names steps /
# guidance; the owner of these numbers (sampling.py, pipeline.py and cli.py's help refer here).
DEFAULT_SAMPLE_STEPS = 25
DEFAULT_GUIDANCE = 6.0

# Allowed range of every numeric key (checked on every build: defaults, YAML, flags and --set alike).
_POSITIVE = dict(low=0.0, low_open=True)
NUMERIC_RULES = {
    "shift": _POSITIVE,
    "logit_mean": {},
    "logit_std": _POSITIVE,
    "caption_dropout": dict(low=0.0, high=1.0, high_open=True),
    "batch_size": dict(integer=True, low=1),
    "grad_accum": dict(integer=True, low=1),
    "lr": dict(low=0.0, low_open=True, high=1.0),  # Adam steps are ~lr per weight: above 1 only diverges
    "weight_decay": dict(low=0.0),
    "fusion_lr_scale": _POSITIVE,
    "grad_clip": _POSITIVE,
    "warmup_steps": dict(integer=True, low=0),
    "ema_decay": dict(low=0.0, high=1.0, high_open=True),
    "ema_every": dict(integer=True, low=1),
    "max_steps": dict(integer=True, low=1),
    "max_minutes": dict(low=0.0, low_open=True, optional=True),
    "seed": dict(integer=True, low=0),
    "num_workers": dict(integer=True, low=0),
    "checkpoint_every": dict(integer=True, low=1),
    "keep_checkpoints": dict(integer=True, low=1),
    "log_every": dict(integer=True, low=1),
    "shuffle_window": dict(integer=True, low=1),
    "deep_first_layer": dict(integer=True, low=0, optional=True),
    "peak_tflops": dict(low=0.0, low_open=True, optional=True),
    "global_batch": dict(integer=True, low=1, optional=True),
    "sample_steps": dict(integer=True, low=1),
    "sample_guidance": {},
    "holdout": dict(integer=True, low=0),
    "validate_every": dict(integer=True, low=1, optional=True),
    "val_sigmas": dict(integer=True, low=1),
    "val_samples": dict(integer=True, low=0),
    "val_sample_steps": dict(integer=True, low=1),
    "val_guidance": {},
}
BOOL_KEYS = ("decay_fusion_logits", "gradient_checkpointing", "compile", "ema", "ema_warmup", "length_batching",
             "log_samples", "allow_new_data")


def check_preset(preset: str, name: str = "preset") -> None:
    """Refuse a DiT size ``presets.PRESETS`` does not have; ``name``: how the user gave it (the demo: ``--preset``)."""
    from semroute.stage2_train.presets import PRESETS

    if preset not in PRESETS:
        raise BadValue(name, f"{preset!r} is unknown; choose one of {', '.join(PRESETS)}")


@dataclass
class TrainConfig:
    # -- data --------------------------------------------------------------------------------
    text_cache: str = ""
    """Text cache written by `encode-text` (folder or URL)."""
    latent_cache: str = ""
    """Latent cache written by `encode-images`."""
    out: str = "runs/run"
    """Run folder: checkpoints, logs, routing plots, resolved config."""
    cache_dir: str | None = None
    """Node-local folder that keeps whole shards of caches on object storage (s3://...) once read."""
    cache_size: str = "50G"
    """Upper bound of cache_dir's size (least recently used shards are dropped)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for s3:// caches (endpoint_url, key, secret ...); default: the AWS environment variables."""
    allow_new_data: bool = False
    """On resume, accept caches that grew (encode-text/-images --append) since the run started: training goes
    on over the union (the sample order of the current epoch changes)."""
    expect_text: dict = field(default_factory=dict)
    """Fingerprint entries the text cache must have, e.g. {llm_weights_sha256: ..., prompt_instruction: ...}."""
    expect_latent: dict = field(default_factory=dict)
    """Fingerprint entries the latent cache must have, e.g. {resolution: 256, resample: bilinear}."""

    # -- model -------------------------------------------------------------------------------
    fusion: str = "depth"
    """penultimate | uniform | static | time | depth | joint | deep."""
    preset: str = "small"
    """DiT size: tiny | small | base | paper."""
    model: dict = field(default_factory=dict)
    """Overrides of DiT config fields (num_blocks, hidden_size, adaln, ...)."""
    text_layers: list | str | None = None
    """LLM layers to read (hidden_states indices or a spec); default: every decoder layer the cache stores
    (penultimate: hidden_states[-2])."""
    deep_first_layer: int | None = None
    """deep fusion: LLM layer paired with DiT block 0 (default: centred pairing)."""

    # -- objective ---------------------------------------------------------------------------
    shift: float = 3.0
    """Scheduler shift s: sigma' = s*sigma / (1 + (s-1)*sigma)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the stored null caption."""

    # -- optimization ------------------------------------------------------------------------
    batch_size: int = 32
    """Samples per process per micro-step."""
    grad_accum: int = 1
    global_batch: int | None = None
    """Samples per optimizer step the run must have: batch_size x processes x grad_accum. When set, a launch
    whose product differs is refused (with the grad_accum or batch_size that fits). The reference: 512 = 8 x 64 x 1."""
    lr: float = 1e-4
    """AdamW learning rate."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    decay_fusion_logits: bool = True
    """Apply weight decay to the routing logits/gates too (the reference does)."""
    fusion_lr_scale: float = 1.0
    """Learning-rate multiplier for the routing gates (the reference: 1). Adam moves a logit by about
    lr per step, so short runs (the CPU demo) need a larger one for the routing to show."""
    grad_clip: float = 1.0
    lr_schedule: str = "constant"
    """constant | warmup (linear warm-up, then constant) | cosine (warm-up, then cosine to 0)."""
    warmup_steps: int = 0
    mixed_precision: str = "auto"
    """auto (bf16 on GPUs that have it, else none) | no | bf16 | fp16."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """Compile each DiT block with torch.compile (regional compilation: one compilation serves all blocks
    per input shape); captions are then padded to text_buckets so it sees few shapes."""
    text_buckets: str | int = "auto"
    """Caption lengths padded up to: none (the batch's longest), pow2 (next power of two, >= 16) or an
    integer multiple; auto = pow2 with compile, else none. The padding is masked."""
    peak_tflops: float | None = None
    """The device's peak for the MFU in metrics.jsonl (default: from a table of GPUs by name)."""
    ema: bool = False
    ema_decay: float = 0.9999
    ema_every: int = 1
    """Update the EMA every N optimizer steps."""
    ema_warmup: bool = True
    """true: diffusers' EMAModel schedule, a plain copy at the first update, then decay min(ema_decay,
    (1 + n) / (10 + n)) at the n-th update. false: the constant ema_decay from the first update on, blending
    into the initial weights (the reference: 0.99 every 100 steps)."""

    # -- run ---------------------------------------------------------------------------------
    max_steps: int = 10000
    """Optimizer steps to train for."""
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much training time."""
    seed: int = 0
    num_workers: int = 1
    """Batch builders per process: threads (loader: thread) or DataLoader worker processes (loader:
    process, each opening the caches itself); 0 builds each batch in the training thread when needed.

    On an H100 a batch of the paper preset was read in ~0.025 s against a 0.22 s step, and more worker
    processes slowed the training process itself (bench/RESULTS.md, training runs 1-7)."""
    loader: str = "thread"
    """How num_workers build batches: thread (threads of the training process, into reused pinned
    buffers; reads, checksums and copies release the GIL) or process (DataLoader worker processes)."""
    length_batching: bool = False
    """Group captions of similar token counts into batches to cut text padding (sorted within stretches of
    64 batches; with shuffle: shards, within each window of shards, so that batches stay shard-local)."""
    shuffle: str = "samples"
    """Sample order of each epoch: samples (every sample shuffled with every other) or shards (shard-local:
    the text cache's shards shuffled and taken shuffle_window at a time, their samples shuffled among
    themselves), for caches on object storage, where a batch then comes in a few long ranged reads instead
    of one request per caption (bench/RESULTS.md, "Data at scale")."""
    shuffle_window: int = 2
    """shuffle: shards: shards whose samples are mixed together (wider mixes more, reads more shards per batch)."""
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    report_to: str = "tensorboard"
    """Tracker for scalars and sample grids (through accelerate): tensorboard | wandb | none. Everything
    also goes to RUN/logs/metrics.jsonl."""
    tensorboard: bool | None = None
    """Deprecated (configs written before report_to): false means report_to: none."""
    log_samples: bool = False
    """Debug: record which sample ids each process trains on (logs/samples-rank<r>.jsonl)."""

    # -- sampling defaults of this run (`semroute sample` / `export`) ---------------------------
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    """Euler steps `semroute sample` uses for this run unless --steps is given (the reference evaluates with 50)."""
    sample_guidance: float = DEFAULT_GUIDANCE
    """Classifier-free guidance `semroute sample` uses for this run unless --guidance is given."""

    # -- watching the run --------------------------------------------------------------------
    holdout: int = 0
    """Samples of the caches kept out of training (chosen by seed, listed in run.json): their cached
    captions and latents are the validation set. 0: no validation."""
    validate_every: int | None = None
    """Validation loss and sample grid every N steps (default: at each checkpoint) and at the end."""
    val_sigmas: int = 8
    """Noise levels of the validation loss: the midpoints (k + 0.5) / n, k < n, with fixed noise."""
    val_samples: int = 4
    """Held-out captions drawn at each validation (RUN/samples/step-*.png); 0: none."""
    val_sample_steps: int = 20
    """Euler steps of those samples."""
    val_guidance: float = DEFAULT_GUIDANCE
    """Classifier-free guidance of those samples (against the stored null caption)."""
    val_guidance_interval: list | None = None
    """``[lo, hi]``: guide those samples only where sigma is in [lo, hi] (see `semroute sample
    --guidance-interval`); None: every step."""

    def __post_init__(self):
        if self.tensorboard is False and self.report_to == "tensorboard":
            self.report_to = "none"
        self.tensorboard = None
        self.validate()

    def validate(self) -> None:
        from semroute.shared.remote import parse_size
        from semroute.stage2_train.models import check_fusion

        check_fusion(self.fusion)
        check_preset(self.preset)
        if self.lr_schedule not in ("constant", "warmup", "cosine"):
            raise BadValue("lr_schedule", f"{self.lr_schedule!r}: use constant, warmup or cosine")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise BadValue("mixed_precision", f"{self.mixed_precision!r}: use auto, no, bf16 or fp16")
        for name, rule in NUMERIC_RULES.items():
            value = getattr(self, name)
            if isinstance(value, str) and not rule.get("integer"):
                value = _yaml11_float(name, value)
            setattr(self, name, check_number(name, value, **rule))
        for name in BOOL_KEYS:
            check_bool(name, getattr(self, name))
        for name in ("text_cache", "latent_cache", "out", "fusion", "preset", "lr_schedule", "mixed_precision"):
            if not isinstance(getattr(self, name), str):
                raise BadValue(name, f"must be a string, got {getattr(self, name)!r}")
        if not self.out.strip():
            raise BadValue("out", "is empty; it names the run folder (e.g. --out runs/depth)")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            # train.py keeps no shard cache for a falsy cache_dir: an empty one would silently mean "none"
            raise BadValue("cache_dir", f"is {self.cache_dir!r}: name a folder for the shards of caches on object "
                                        "storage (e.g. --cache-dir /scratch/shards), or leave it out")
        if self.report_to not in REPORT_TO:
            raise BadValue("report_to", f"{self.report_to!r}: use {', '.join(REPORT_TO)}")
        try:
            parse_size(self.cache_size)  # train.py reads it once the caches are open: a bad size is named here, first
        except SemrouteError:
            raise BadValue("cache_size", f"{self.cache_size!r}: use a size like 20G, 512M or 1000000") from None
        for name in ("model", "expect_text", "expect_latent", "storage_options"):
            if not isinstance(getattr(self, name), dict):
                raise BadValue(name, f"must be a mapping (e.g. --set {name}.key=value), got {getattr(self, name)!r}")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise BadValue("betas", f"must be a list of two numbers, got {self.betas!r}")
        self.betas = [check_number(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(self.betas)]
        if self.text_layers is not None and not isinstance(self.text_layers, (str, list)):
            raise BadValue("text_layers", f"must be a spec string or a list of layer indices, got {self.text_layers!r}")
        if self.text_layers in ([], ""):  # a model reading no layer: a failure deep in its first step otherwise
            raise BadValue("text_layers", f"is {self.text_layers!r}: name at least one layer (or leave it unset)")
        if self.shuffle not in ("samples", "shards"):
            raise BadValue("shuffle", f"{self.shuffle!r}: use samples or shards")
        if self.loader not in ("thread", "process"):
            raise BadValue("loader", f"{self.loader!r}: use thread or process")
        if self.val_guidance_interval is not None:
            self.val_guidance_interval = list(check_guidance_interval(self.val_guidance_interval))
        self.text_length_buckets()  # a clear error for a bad text_buckets

    def text_length_buckets(self):
        from semroute.stage2_train.data import TextBuckets

        spec = self.text_buckets
        if spec == "auto":
            spec = "pow2" if self.compile else "none"
        return TextBuckets(spec)

    def check_global_batch(self, num_processes: int) -> None:
        """Refuse a launch whose batch_size x processes x grad_accum is not ``global_batch`` (when set)."""
        if self.global_batch is None:
            return
        got = self.batch_size * num_processes * self.grad_accum
        if got == self.global_batch:
            return
        per_step = self.batch_size * num_processes
        if self.global_batch % per_step == 0:
            fix = f"set grad_accum={self.global_batch // per_step}"
        elif self.global_batch % (num_processes * self.grad_accum) == 0:
            fix = f"set batch_size={self.global_batch // (num_processes * self.grad_accum)}"
        else:
            fix = f"choose batch_size x grad_accum = {self.global_batch} / {num_processes} per process"
        raise SemrouteError(
            f"global_batch is {self.global_batch}, but batch_size {self.batch_size} x {num_processes} processes x "
            f"grad_accum {self.grad_accum} = {got}; {fix} (--set ...), or --set global_batch=null to train with {got}."
        )

    def check_tracker(self) -> None:
        """Refuse a ``report_to`` tracker that is not installed: accelerate only warns and trains without it, so a
        run meant to be watched would log nowhere. Checked when training starts (``Trainer``), not in ``validate``:
        sampling or exporting a run reads its config too, and needs no tracker."""
        if self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            others = "|".join(t for t in REPORT_TO if t != self.report_to)
            raise SemrouteError(f"--report-to {self.report_to}: the {self.report_to} package is not installed; pip "
                                f"install {self.report_to}, or use --report-to {others}")

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, *, config_file: str | None = None, overrides: list[str] | None = None,
              flags: dict[str, str] | None = None, **fields) -> "TrainConfig":
        """Defaults <- the fusion's preset file (or ``config_file``: a path or a name under configs/) <- ``fields``
        <- ``key=value`` overrides.

        ``fields`` are field values already of the field's type (the CLI's options parse them so, see
        ``option_type``); None means not given. ``flags``: the option each of ``fields`` was given as
        (``{"batch_size": "--batch-size"}``). ``overrides`` are ``--set`` texts, read as YAML. A refused value
        is named as the user gave it: by its option, or by its key after the ``--set`` or config file that set it."""
        unknown = sorted(set(fields) - set(cls.keys()))
        if unknown:
            raise SemrouteError(f"unknown config field(s) {unknown}; valid fields: {', '.join(cls.keys())}")
        given = {k: v for k, v in fields.items() if v is not None}
        values: dict = {}
        named: dict[str, tuple[str, str]] = {}  # key -> (its name, where it was set) in the error of a bad value

        def read(path: Path) -> None:
            loaded = load_yaml(path)
            values.update(loaded)
            named.update((k, (k, f"config file {path}: ")) for k in loaded)

        fusion = given.get("fusion")
        if config_file is None and fusion in FUSION_CONFIGS:
            preset_file = CONFIG_DIR / FUSION_CONFIGS[fusion]
            if preset_file.exists():
                read(preset_file)
        if config_file is not None:
            read(resolve_config(config_file))
            if fusion is not None and values.get("fusion", fusion) != fusion:
                # The file's other keys (RoPE base, gate settings) belong to its own fusion: mixing them with
                # another would train neither the file's run nor the other fusion's (e.g. configs/paper/*).
                raise SemrouteError(f"--fusion {fusion}: config file {config_file} is a {values['fusion']} run (its "
                                    f"other settings belong to that fusion); use a config file for {fusion} (e.g. "
                                    f"the one beside it) or leave out --fusion")
        values.update(given)
        named.update((k, ((flags or {}).get(k, k), "")) for k in given)
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise SemrouteError(f"--set {item!r}: expected key=value")
            key = key.strip()
            # A text-valued key keeps the text as typed: YAML would read `no`/`off` as False (mixed_precision=no).
            try:
                value = yaml.load(raw, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as err:
                raise SemrouteError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); quote "
                                    "a text value, e.g. --set 'key=\"...\"'") from None
            if cls.field_type(key) == "str" and not isinstance(value, str):
                value = raw.strip()
            head, dot, sub = key.partition(".")
            if dot:  # model.adaln=true sets one entry of a dict-valued key
                if head not in ("model", "expect_text", "expect_latent"):
                    raise SemrouteError(f"--set {item!r}: only model.*, expect_text.* and expect_latent.* take a "
                                        "dotted key")
                values[head] = {**values.get(head, {}), sub: value}
            else:
                values[key] = value
            named[head] = (head, f"--set {item!r}: ")
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise SemrouteError(f"unknown config key(s) {unknown}; valid keys: {', '.join(cls.keys())}")
        try:
            return cls(**values)
        except BadValue as err:
            if err.name not in named:
                raise
            name, where = named[err.name]
            raise SemrouteError(f"{where}{name} {err.problem}") from None

    @classmethod
    def option_type(cls, key: str) -> type:
        """The type a command-line option of field ``key`` parses to: the field's annotation without its
        ``None`` (``float | None`` -> float). Fields of several types (text_layers) take ``--set`` instead."""
        hint = typing.get_type_hints(cls)[key]
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
        if len(kinds) != 1:
            raise TypeError(f"field {key} ({hint}) has no single option type")
        return kinds[0]

    @classmethod
    def default(cls, key: str):
        """The default of field ``key`` (a fresh one for list and dict fields)."""
        f = cls.__dataclass_fields__[key]
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @classmethod
    def field_type(cls, key: str) -> str | None:
        """The annotation of field ``key`` as written (this module's annotations are strings), or None."""
        for f in dataclasses.fields(cls):
            if f.name == key:
                return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None)
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Through a temporary file and a rename: a run's config.yaml is never left half-written (a kill, a full
        disk), which would read as defaults for the keys cut off."""
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def config_names() -> list[str]:
    """Names ``--config`` accepts: the YAML files under configs/ without their suffix (``paper/joint``, ...)."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config(spec: str | Path) -> Path:
    """``--config``: an existing file, or a name of ``config_names()`` (``depth-wise``, ``paper/depth-wise``)."""
    if not str(spec).strip():  # Path('') is the working folder
        raise SemrouteError(f"--config is empty; give a YAML file or a config name: {', '.join(config_names())}")
    path = Path(spec)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path  # a missing .yaml file is reported by load_yaml, naming it
    named = CONFIG_DIR / f"{spec}.yaml"
    if named.exists():
        return named
    raise SemrouteError(f"--config {spec}: no such file, and not a config name; names: {', '.join(config_names())}")


def field_help(name: str) -> str:
    """The first paragraph of the docstring under field ``name`` of ``TrainConfig`` (its help text; later
    paragraphs are notes for readers of this file), '' if it has none."""
    return _field_docs().get(name, "")


@functools.cache
def _field_docs() -> dict[str, str]:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.strip().split("\n\n")[0].split())
    return docs


def _yaml11_float(name: str, raw: str) -> float:
    """PyYAML reads YAML 1.1, where ``1e-4`` (no dot) is a string, not a float: accept such numbers."""
    try:
        return float(raw)
    except ValueError:
        raise BadValue(name, f"must be a number, got {raw!r}") from None


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key {key!r} is given twice (first on line {first}); YAML would silently keep the last: "
                         "give it once")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that gives a key twice (``lr: 1e-4`` ... ``lr: 3e-4``), which
    PyYAML reads as the last one. Merged keys (``<<: *base``) may still be overridden: they are not compared."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _RepeatedKey(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise SemrouteError(f"config file {path} does not exist") from None
    except OSError as err:  # a folder (--config .), no permission
        raise SemrouteError(f"cannot read config file {path}: {err.strerror or err}") from None
    except _RepeatedKey as err:
        raise SemrouteError(f"config file {path}:{err.line}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SemrouteError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SemrouteError(f"config file {path} must hold a mapping of keys to values")
    return data
