"""configs/paper/: one config per strategy reproducing the reference's model and recipe (README, "Differences
from the reference"); the global-batch check, the EMA schedule and the run's sampling defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.config import CONFIG_DIR, TrainConfig
from semroute.stage2_train.deep_fusion import DeepFusionDiT
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.sampling import SampleConfig, sampling_defaults, with_sampling_defaults
from semroute.stage2_train.train import Trainer, build_ema, update_ema
from test_reference_model import deep_parameter_count, dit_parameter_count

PAPER_DIR = CONFIG_DIR / "paper"
# file -> (--fusion name, the reference's 2D RoPE base for it; None: deep fusion uses the LLM's)
PAPER_CONFIGS = {
    "penultimate.yaml": ("penultimate", 1e4),
    "uniform.yaml": ("uniform", 1e4),
    "static.yaml": ("static", 1e5),
    "time-wise.yaml": ("time", 1e5),
    "depth-wise.yaml": ("depth", 1e5),
    "joint.yaml": ("joint", 1e5),
    "deep.yaml": ("deep", None),
}


def paper(name: str, **flags) -> TrainConfig:
    return TrainConfig.build(config_file=str(PAPER_DIR / name), **flags)


def test_one_paper_config_per_strategy_and_shipped_as_package_data():
    assert sorted(p.name for p in PAPER_DIR.glob("*.yaml")) == sorted(PAPER_CONFIGS)
    pyproject = (CONFIG_DIR.parent / "pyproject.toml").read_text()
    assert '"paper/*.yaml"' in pyproject  # setuptools package-data glob of semroute.configs


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_paper_config_is_the_reference_recipe(name):
    fusion, theta = PAPER_CONFIGS[name]
    cfg = paper(name, preset="paper")  # as `--config configs/paper/NAME --preset paper` gives it
    assert (cfg.fusion, cfg.preset) == (fusion, "paper")
    # Global batch 512 = 8 per process x 64 processes x 1 accumulation step.
    assert cfg.global_batch == 512 == cfg.batch_size * 64 * cfg.grad_accum and cfg.batch_size == 8
    assert (cfg.max_steps, cfg.seed) == (500_000, 42)
    assert (cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.fusion_lr_scale) == (1e-4, "constant", 0, 1.0)
    assert (cfg.weight_decay, cfg.decay_fusion_logits, cfg.grad_clip) == (1e-4, True, 1.0)
    assert (cfg.caption_dropout, cfg.shift, cfg.logit_mean, cfg.logit_std) == (0.1, 3.0, 0.0, 1.0)
    assert (cfg.ema, cfg.ema_decay, cfg.ema_every, cfg.ema_warmup) == (True, 0.99, 100, False)
    assert (cfg.sample_steps, cfg.sample_guidance) == (50, 6.0)
    assert (cfg.betas, cfg.mixed_precision) == ([0.9, 0.999], "bf16")
    # The caches it trains on must be the reference's: LLM, prompt format, images, autoencoder.
    assert cfg.expect_text == {"llm_num_hidden_layers": 36, "llm_hidden_size": 2560,
                               "prompt_instruction": "Describe this image.", "prompt_chat_template": False,
                               "prompt_max_length": 512}
    assert cfg.expect_latent == {"resolution": 256, "resample": "bilinear", "crop": "center", "latent_channels": 16}
    assert cfg.text_layers == (None if fusion in ("penultimate", "deep") else "all")
    # The model it builds (2.2B parameters: on the meta device) has the reference's keys and size.
    with torch.device("meta"):
        if fusion == "deep":
            model = DeepFusionDiT.from_preset(cfg.preset, llm_first_layer=cfg.deep_first_layer, **cfg.model)
        else:
            model = SemrouteDiT.from_preset(cfg.preset, fusion=fusion, **cfg.model)
    if fusion == "deep":
        assert model.config.image_rope == "reference" and model.text_layers == list(range(6, 30))
        trainable = sum(p.numel() for p in model.trainable_parameters())
        frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm_layers."))
        assert (trainable, frozen) == deep_parameter_count(model.config)
        return
    assert model.config.context_embedder_type == "reference" and model.config.rope_theta == theta
    c = model.config
    assert (c.num_blocks, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_hidden_size, c.patch_size,
            c.in_channels, c.text_dim, c.llm_num_layers) == (24, 2048, 32, 8, 128, 8192, 2, 16, 2560, 36)
    assert model.context_embedder[1].weight.shape == (2560, 2560)
    assert len(model.text_layers) == (1 if fusion == "penultimate" else 36)
    if fusion in ("time", "joint"):
        assert (model.config.gate_sigma_scale, model.config.gate_init) == (1.0, "reference")
    total = sum(p.numel() for p in model.parameters())
    print(f"{name}: {total:,} parameters")
    assert total == dit_parameter_count(model.config)


def test_global_batch_is_checked_against_the_launch():
    cfg = paper("depth-wise.yaml")
    cfg.check_global_batch(64)  # 8 x 64 x 1: the reference's launch
    with pytest.raises(SemrouteError, match=r"8 x 1 processes x grad_accum 1 = 8; set grad_accum=64"):
        cfg.check_global_batch(1)
    with pytest.raises(SemrouteError, match="set grad_accum=8"):
        cfg.check_global_batch(8)
    TrainConfig.build(config_file=str(PAPER_DIR / "depth-wise.yaml"), overrides=["grad_accum=8"]).check_global_batch(8)
    TrainConfig(global_batch=None, batch_size=3).check_global_batch(5)  # unset: anything goes


def test_trainer_refuses_a_launch_with_another_global_batch(square_caches, tmp_path):
    text, latents, _ = square_caches
    cfg = TrainConfig(text_cache=text, latent_cache=latents, out=str(tmp_path / "run"), preset="tiny", batch_size=8,
                      global_batch=512, num_workers=0, tensorboard=False)
    with pytest.raises(SemrouteError, match="global_batch is 512"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))


def run_ema(cfg: TrainConfig, steps: int) -> list[float]:
    """The EMA value after each step when the parameter equals the step number after step s."""
    toy = Toy()
    ema = build_ema(toy, cfg)
    values = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            toy.p.fill_(float(step))  # the "optimizer step"
        update_ema(ema, step, toy.parameters(), cfg.ema_every)
        values.append(ema.shadow_params[0].item())
    return values


def test_paper_ema_is_decay_0_99_every_100_steps_from_the_initial_weights():
    cfg = paper("depth-wise.yaml")
    values = run_ema(cfg, 350)
    expected, ema = [], 0.0  # the initial weight
    for step in range(1, 351):
        if step % 100 == 0:
            ema = 0.99 * ema + 0.01 * step
        expected.append(ema)
    assert values == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert values[99] == pytest.approx(1.0) and values[349] == values[299]  # updates at 100, 200, 300 only
    # The warm-up schedule (our default) instead copies the weights at the first update.
    warm = run_ema(TrainConfig(ema=True, ema_decay=0.99, ema_every=100), 100)
    assert warm[-1] == 100.0


def test_constant_ema_schedule_survives_a_resume():
    from diffusers.training_utils import EMAModel

    ema = build_ema(Toy(), paper("joint.yaml"))
    restored = EMAModel(Toy().parameters())  # default schedule until the checkpoint's state is loaded
    restored.load_state_dict(ema.state_dict())
    assert [restored.get_decay(n) for n in (1, 2, 50)] == [0.99, 0.99, 0.99]


def test_sampling_defaults_come_from_the_run_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000001" / "model").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    paper("depth-wise.yaml").save(run / "config.yaml")
    assert sampling_defaults(run) == sampling_defaults(run / "checkpoints" / "step-0000001") == {"steps": 50, "guidance": 6.0}
    cfg = with_sampling_defaults(SampleConfig(checkpoint=str(run), out="o"))
    assert (cfg.steps, cfg.guidance) == (50, 6.0)
    cfg = with_sampling_defaults(SampleConfig(checkpoint=str(run), out="o", steps=4, guidance=1.0))
    assert (cfg.steps, cfg.guidance) == (4, 1.0)
    # An exported pipeline carries them in its text settings; a folder that names none gets 25 / 6.0.
    pipe = tmp_path / "pipe"
    (pipe / "text").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "text" / "semroute_text.json").write_text(json.dumps({"sample_defaults": {"steps": 50, "guidance": 6.0}}))
    assert sampling_defaults(pipe) == {"steps": 50, "guidance": 6.0}
    cfg = with_sampling_defaults(SampleConfig(checkpoint=str(Path(tmp_path / "nothing")), out="o"))
    assert (cfg.steps, cfg.guidance) == (25, 6.0)


@pytest.mark.slow  # one CLI training subprocess: ~15 s on a busy 2-core machine
def test_cli_trains_from_a_paper_config_and_saves_the_reference_keys(square_caches, tmp_path):
    """`train --config configs/paper/time-wise.yaml` (at the tiny size, one process, so with the global batch
    it has): the run's model config.json holds the reference's keys, and the EMA is kept."""
    from testkit import run_cli

    text, latents, _ = square_caches
    run_cli("train", "--config", str(PAPER_DIR / "time-wise.yaml"), "--text-cache", text, "--latent-cache", latents,
            "--preset", "tiny", "--num-workers", "0", "--no-progress", "--max-steps", "1", "--set", "global_batch=8",
            "--set", "tensorboard=false", "--set", "mixed_precision='no'", "--set", "expect_text={}",
            "--set", "expect_latent={}", "--out", str(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    saved = json.loads((checkpoint / "model" / "config.json").read_text())
    assert (saved["context_embedder_type"], saved["rope_theta"], saved["gate_sigma_scale"], saved["gate_init"]) == (
        "reference", 1e5, 1.0, "reference")
    assert (checkpoint / "model_ema").is_dir()


@pytest.mark.parametrize("name", ["depth-wise.yaml", "penultimate.yaml"])
def test_a_paper_config_refuses_caches_that_are_not_the_references(square_caches, tmp_path, name):
    """The tiny test caches (another LLM, 32 px images, bicubic, a pixel codec) are named key by key, before
    anything is written; --set expect_*={} trains on them anyway (the slow CLI test above)."""
    from semroute.shared.errors import FingerprintMismatch

    text, latents, _ = square_caches
    cfg = paper(name, text_cache=text, latent_cache=latents, preset="tiny", out=str(tmp_path / "run"), num_workers=0,
                overrides=["global_batch=null"], tensorboard=False, mixed_precision="no")
    with pytest.raises(FingerprintMismatch, match=r"(?s)text cache .* does not fit this run:.*llm_hidden_size: cache "
                                                  r"has \d+, expected 2560.*--set expect_text=\{\}"):
        Trainer(cfg, progress=False)
    cfg.expect_text = {}
    with pytest.raises(FingerprintMismatch, match=r"(?s)latent cache .* does not fit this run:.*latent_channels: cache "
                                                  r"has 12, expected 16.*resample: cache has 'bicubic', expected "
                                                  r"'bilinear'.*resolution: cache has 32, expected 256.*"
                                                  r"--set expect_latent=\{\}"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_another_fusion_than_the_config_files_is_refused():
    with pytest.raises(SemrouteError, match=r"--fusion time: config file .*depth-wise.yaml is a depth run"):
        paper("depth-wise.yaml", fusion="time")
    assert paper("depth-wise.yaml", fusion="depth").fusion == "depth"  # the same fusion: fine
