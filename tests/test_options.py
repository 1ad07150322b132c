"""Option checks: nonsense numbers are refused by name before any work starts; options do what they say
(the pixel codec's patch size, --image-root's confinement)."""

from __future__ import annotations

import os

import pytest
import torch

from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.latent_store import LatentCacheReader
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.sampling import SampleConfig, sample
from testkit import run_cli, write_manifest, write_square_images


@pytest.mark.parametrize("override, message", [
    ("grad_clip=-1", r"grad_clip must be > 0, got -1"),
    ("grad_clip=0", r"grad_clip must be > 0"),
    ("lr=.inf", r"lr must be a finite number"),
    ("lr=inf", r"lr must be a finite number"),
    ("lr=abc", r"lr must be a number, got 'abc'"),
    ("lr=0", r"lr must be > 0"),
    ("lr=1e38", r"lr must be > 0 and <= 1, got 1e\+38"),
    ("storage_options=x", r"storage_options must be a mapping \(e.g. --set storage_options.key=value\), got 'x'"),
    ("shift=.nan", r"shift must be a finite number"),
    ("shift=0", r"shift must be > 0"),
    ("ema='false'", r"ema must be true or false, got str 'false'"),
    ("ema=1", r"ema must be true or false"),
    ("max_steps=0", r"max_steps must be >= 1"),
    ("max_steps=2.5", r"max_steps must be an integer"),
    ("batch_size=true", r"batch_size must be an integer, got a boolean"),
    ("max_minutes=.nan", r"max_minutes must be a finite number"),
    ("num_workers=-1", r"num_workers must be >= 0"),
    ("ema_decay=1", r"ema_decay must be >= 0 and < 1"),
    ("caption_dropout=1", r"caption_dropout must be >= 0 and < 1"),
    ("betas=[0.9]", r"betas must be a list of two numbers"),
    ("betas=[0.9, 1.5]", r"betas\[1\] must be >= 0 and < 1"),
    ("model=3", r"model must be a mapping"),
    ("weight_decay=-1", r"weight_decay must be >= 0"),
])
def test_train_config_refuses_values_outside_their_range(override, message):
    with pytest.raises(SemrouteError, match=message):
        TrainConfig.build(fusion="depth", overrides=[override])


def test_train_config_reads_yaml11_exponents_as_numbers():
    cfg = TrainConfig.build(fusion="depth", overrides=["lr=2e-4", "max_minutes=1e1"])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float) and cfg.max_minutes == 10.0


def test_cli_prints_one_line_for_a_bad_number(tmp_path):
    proc = run_cli("train", "--text-cache", "t", "--latent-cache", "l", "--fusion", "depth", "--lr", "inf",
                   "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 1
    assert "error: --lr must be a finite number, got inf" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def _train(tmp_path, *args):
    from typer.testing import CliRunner

    from semroute.cli import app

    result = CliRunner().invoke(app, ["train", "--text-cache", "t", "--latent-cache", "l", "--fusion", "depth",
                                      "--out", str(tmp_path / "r"), "--no-progress", *args])
    assert result.exit_code != 0 and isinstance(result.exception, SemrouteError), result.output
    assert not (tmp_path / "r").exists()
    return str(result.exception)


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "-3", "--batch-size must be >= 1, got -3"),
    ("--lr", "2", "--lr must be > 0 and <= 1, got 2.0"),
    ("--max-steps", "0", "--max-steps must be >= 1, got 0"),
    ("--max-minutes", "0", "--max-minutes must be > 0, got 0.0"),
    ("--validate-every", "0", "--validate-every must be >= 1, got 0"),
    ("--holdout", "-1", "--holdout must be >= 0, got -1"),
    ("--num-workers", "-1", "--num-workers must be >= 0, got -1"),
    ("--report-to", "mlflow", "--report-to 'mlflow': use tensorboard, wandb, none"),
    ("--preset", "huge", "--preset 'huge' is unknown; choose one of"),
    ("--out", " ", "--out is empty"),
    ("--cache-size", "lots", "--cache-size 'lots': use a size like 20G"),
    ("--cache-dir", "", "--cache-dir is '': name a folder for the shards"),  # an empty one meant "no shard cache"
])
def test_train_names_a_bad_value_by_the_flag_it_came_from(tmp_path, flag, value, message):
    said = _train(tmp_path, flag, value)
    assert said.startswith(message), said


def test_train_errors_name_each_flag_as_declared():
    import typer

    from semroute.cli import Field, app

    train = typer.main.get_command(app).commands["train"]
    declared = {p.name.rstrip("_"): p.opts for p in train.params if p.name.rstrip("_") in TrainConfig.keys()}
    assert len(declared) >= 18 and all(Field.flag(key) in opts for key, opts in declared.items())


def test_train_names_a_bad_value_by_the_set_or_config_file_it_came_from(tmp_path):
    said = _train(tmp_path, "--set", "batch_size=-3")
    assert said == "--set 'batch_size=-3': batch_size must be >= 1, got -3"
    config = tmp_path / "mine.yaml"
    config.write_text("batch_size: -3\nshuffle: rows\n")
    assert _train(tmp_path, "--config", str(config)).startswith(f"config file {config}: batch_size must be >= 1")
    # the source that set the value last is the one named
    assert _train(tmp_path, "--config", str(config), "--batch-size", "0").startswith("--batch-size must be >= 1")
    assert _train(tmp_path, "--config", str(config), "--batch-size", "4", "--set", "batch_size=0").startswith(
        "--set 'batch_size=0': batch_size must be >= 1")
    assert _train(tmp_path, "--config", str(config), "--batch-size", "4") == \
        f"config file {config}: shuffle 'rows': use samples or shards"
    # a model reading no layer failed deep in its first step (IndexError), leaving a run folder behind
    assert _train(tmp_path, "--set", "text_layers=[]") == \
        "--set 'text_layers=[]': text_layers is []: name at least one layer (or leave it unset)"


@pytest.mark.parametrize("field, value, message", [
    ("guidance", float("nan"), "--guidance must be a finite number"),
    ("guidance", float("inf"), "--guidance must be a finite number"),
    ("steps", 0, "--steps must be >= 1"),
    ("n", 0, "--n must be >= 1"),
    ("resolution", 0, "--resolution must be >= 1"),
    ("seed", -1, "--seed must be >= 0"),
])
def test_sample_refuses_bad_numbers(tmp_path, field, value, message):
    cfg = SampleConfig(checkpoint=str(tmp_path / "none"), out=str(tmp_path / "o"), prompts=["a"], progress=False)
    setattr(cfg, field, value)
    with pytest.raises(SemrouteError, match=message):
        sample(cfg)
    assert not (tmp_path / "o").exists()


def test_encode_text_refuses_a_max_length_that_leaves_no_caption(tmp_path, tiny_llama_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"text": " a red square"}])
    with pytest.raises(SemrouteError, match="--max-length must be >= 1, got -1"):
        encode_text(EncodeTextConfig(data=str(manifest), out=str(tmp_path / "a"), max_length=-1, progress=False))
    with pytest.raises(SemrouteError, match=r"--max-length 3 leaves no room for captions.*use --max-length > \d+"):
        encode_text(EncodeTextConfig(data=str(manifest), out=str(tmp_path / "b"), llm=str(tiny_llama_dir),
                                     max_length=3, dtype="float32", device="cpu", progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("patch, shape", [(1, (3, 32, 32)), (4, (48, 8, 8)), (16, (768, 2, 2))])
def test_pixel_codec_uses_the_patch_size_asked_for(tmp_path, patch, shape):
    from semroute.shared.images import ImageOptions, load_image
    from semroute.shared.vae import PixelCodec, pixels_to_unit

    records = write_square_images(tmp_path / "img", 2)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = tmp_path / "l.zarr"
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(out), vae="pixel", patch_size=patch, resolution=32,
                                     workers=0, device="cpu", progress=False))
    reader = LatentCacheReader(out)
    z = reader.latent(0)
    assert tuple(z.shape) == shape and reader.fingerprint["patch_size"] == patch
    pixels = torch.from_numpy(load_image(records[0]["image"], ImageOptions(resolution=32))[0])
    assert torch.equal(z, pixels_to_unit(PixelCodec(patch).encode_codes(pixels[None]))[0])


def test_image_root_confines_paths(tmp_path):
    root = tmp_path / "root"
    inside = write_square_images(root / "img", 2)
    outside = write_square_images(tmp_path / "elsewhere", 1)
    os.symlink(outside[0]["image"], root / "img" / "link.png")
    cases = {
        "dotdot": "../elsewhere/0000.png",
        "absolute": outside[0]["image"],
        "symlink": "img/link.png",
    }
    base = [{"image": os.path.relpath(r["image"], root), "text": r["text"]} for r in inside]
    for name, path in cases.items():
        manifest = write_manifest(tmp_path / f"{name}.jsonl", [*base, {"image": path, "text": " x"}])
        cfg = dict(data=str(manifest), vae="pixel", resolution=32, image_root=str(root), workers=0, device="cpu",
                   progress=False)
        with pytest.raises(ManifestError, match=rf"{name}.jsonl:3: image .* outside --image-root"):
            encode_images(EncodeImagesConfig(out=str(tmp_path / f"{name}.zarr"), **cfg))
        skipped = encode_images(EncodeImagesConfig(out=str(tmp_path / f"{name}-skip.zarr"), skip_bad=True, **cfg))
        assert skipped["n_encoded"] == 2 and "outside --image-root" in skipped["skipped"][0]["reason"]
        allowed = encode_images(EncodeImagesConfig(out=str(tmp_path / f"{name}-ok.zarr"), allow_outside_root=True,
                                                   **cfg))
        assert allowed["n_encoded"] == 3



def test_an_image_root_that_is_not_a_folder_is_named_once(tmp_path):
    records = write_square_images(tmp_path / "img", 2)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    (tmp_path / "file").write_text("x")
    for root, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is not a folder")):
        out = tmp_path / f"{root.name}.zarr"
        cfg = EncodeImagesConfig(data=str(manifest), out=str(out), vae="pixel", resolution=32, image_root=str(root),
                                 workers=0, device="cpu", progress=False, skip_bad=True)
        with pytest.raises(SemrouteError, match=rf"^--image-root {root} {what}; give the folder"):
            encode_images(cfg)
        assert not out.exists()
    from typer.testing import CliRunner

    from semroute.cli import app

    result = CliRunner().invoke(app, ["encode-images", str(manifest), "--vae", "pixel", "--resolution", "32",
                                      "--image-root", "", "--out", str(tmp_path / "e.zarr"), "--no-progress"])
    assert str(result.exception).startswith("--image-root is empty"), result.exception
    assert not (tmp_path / "e.zarr").exists()

def test_set_keeps_text_values_as_typed():
    # YAML reads `no` as False; a text-valued key must get the word the user typed.
    from semroute.stage2_train.config import TrainConfig

    cfg = TrainConfig.build(fusion="depth", overrides=["mixed_precision=no", "lr_schedule='warmup'"])
    assert cfg.mixed_precision == "no" and cfg.lr_schedule == "warmup"


@pytest.mark.parametrize("fusion, model, message", [
    ("static", {"bogus": 1}, r"model.bogus is not a setting of SemrouteDiT; its settings are: in_channels, "),
    ("deep", {"num_heads": 4}, r"model.num_heads is not a setting of DeepFusionDiT"),
    ("static", {"num_blocks": "abc"}, r"model.num_blocks must be an integer, got str 'abc'"),
    ("static", {"num_blocks": 0}, r"model.num_blocks must be >= 1, got 0"),
    ("static", {"adaln": "maybe"}, r"model.adaln must be true or false, got str 'maybe'"),
    ("static", {"norm_eps": -1.0}, r"model.norm_eps must be >= 0"),
    ("static", {"num_kv_heads": 3}, r"model.num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"),
    ("static", {"text_layers": [1]}, r"model.text_layers: set the top-level key text_layers instead"),
])
def test_bad_model_settings_are_named_before_the_model_is_built(fusion, model, message):
    from semroute.stage2_train.models import build_model

    cfg = TrainConfig.build(fusion=fusion, preset="tiny", overrides=[f"model.{k}={v}" for k, v in model.items()])
    with pytest.raises(SemrouteError, match=message):
        build_model(cfg, {"llm_num_hidden_layers": 4, "llm_hidden_size": 32}, [1, 2, 3, 4], 4)
    # the same model without the bad key builds
    assert build_model(TrainConfig.build(fusion="static", preset="tiny"),
                       {"llm_num_hidden_layers": 4, "llm_hidden_size": 32}, [1, 2, 3, 4], 4).config.num_blocks == 2


@pytest.mark.parametrize("interval, said", [(("abc",), r"guidance interval abc: give two sigmas LO,HI in \[0, 1\]"),
                                            (("a", "b"), r"guidance interval a,b: give two sigmas"),
                                            (("0.8", "0.3"), r"guidance interval 0.8,0.3: need 0 <= LO < HI <= 1")])
def test_a_bad_guidance_interval_is_shown_as_typed(interval, said):
    from semroute.shared.checks import check_guidance_interval

    with pytest.raises(SemrouteError, match=said):
        check_guidance_interval(interval)
