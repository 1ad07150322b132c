"""Sampling, export, prompt-file layouts, routing plots and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.pipeline import SemroutePipeline
from semroute.stage2_train.sampling import SampleConfig, sample, sampling_defaults
from semroute.stage2_train.train import train
from testkit import CLI, run_cli

GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


@pytest.fixture(scope="module")
def trained_run(square_caches, tmp_path_factory):
    text, latents, _ = square_caches
    out = tmp_path_factory.mktemp("run") / "depth"
    cfg = TrainConfig(text_cache=text, latent_cache=latents, out=str(out), preset="tiny", fusion="depth",
                      batch_size=8, num_workers=0, report_to="none", max_steps=6, checkpoint_every=6, lr=1e-3,
                      ema=True, ema_decay=0.5)
    train(cfg, progress=False)
    return out


def _images(result) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]


def test_prompt_encoding_equals_the_cached_features(trained_run, square_caches):
    pipe = SemroutePipeline.from_run(trained_run, device="cpu")
    reader = TextCacheReader(square_caches[0])
    texts = reader.index.column("text").to_pylist()
    picks = [0, 5, 17]
    encoded = pipe.encode_prompts([texts[i] for i in picks])
    for i, feats in zip(picks, encoded):
        torch.testing.assert_close(feats, reader.caption(i), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe.null_features, reader.null())


def test_bf16_storage_is_reproduced_at_sampling_time(square_caches, tiny_llama_dir, tmp_path):
    """A cache computed in float32 and stored as bf16: the pipeline rounds prompts the same way."""
    text, latents, manifest = square_caches
    bf16 = tmp_path / "bf16.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(bf16), llm=str(tiny_llama_dir), dtype="float32",
                                 storage="bf16", progress=False))
    run = tmp_path / "run"
    train(TrainConfig(text_cache=str(bf16), latent_cache=latents, out=str(run), preset="tiny", batch_size=8,
                      num_workers=0, report_to="none", max_steps=1, checkpoint_every=1), progress=False)
    pipe = SemroutePipeline.from_run(run, device="cpu")
    reader = TextCacheReader(bf16)
    assert reader.caption(0).dtype == torch.bfloat16
    got = pipe.encode_prompts([reader.index.column("text")[0].as_py()])[0]
    assert got.dtype == torch.bfloat16
    # both sides are the float32 model output rounded to bf16; batch shapes may move a value across a
    # rounding boundary, so allow one bf16 ulp
    torch.testing.assert_close(got.float(), reader.caption(0).float(), rtol=8e-3, atol=1e-5)


def test_export_then_from_pretrained_gives_the_same_images(trained_run, tmp_path):
    prompts = ["a red square on the left", "a blue square on the right"]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    pipe = SemroutePipeline.from_run(trained_run, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    a = _images(pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens()))
    run_cli("export", str(trained_run), "--out", str(tmp_path / "pipe"))
    exported = SemroutePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    exported.set_progress_bar_config(disable=True)
    b = _images(exported(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens()))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the run's sampling defaults (config sample_steps / sample_guidance) travel with the export
    assert sampling_defaults(tmp_path / "pipe") == sampling_defaults(trained_run) == {"steps": 25, "guidance": 6.0}
    # reusing the per-prompt text keys/values across steps changes nothing
    c = _images(pipe(prompts, num_inference_steps=4, guidance_scale=3.0, generator=gens(), reuse_text=False))
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    # an image does not depend on its batch-mates: the second image regenerated alone
    alone = _images(pipe(prompts[1:], num_inference_steps=4, guidance_scale=3.0, generator=gens()[1:]))
    assert np.array_equal(alone[0], a[1])
    # the EMA weights export too, and differ from the raw ones
    run_cli("export", str(trained_run), "--out", str(tmp_path / "ema"), "--ema")
    raw = (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "ema" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != raw


def test_guidance_interval_guides_only_the_steps_inside_it(trained_run, tmp_path):
    prompts = ["a red square on the left", "a blue square on the right"]
    pipe = SemroutePipeline.from_run(trained_run, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    batches = []
    real_forward = pipe.transformer.forward

    def counting(latents, *args, **kwargs):
        batches.append(latents.shape[0])
        return real_forward(latents, *args, **kwargs)

    pipe.transformer.forward = counting

    def run(**kw) -> torch.Tensor:
        batches.clear()
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        return pipe(prompts, num_inference_steps=4, generator=gens, output_type="pt", **kw).images

    pipe.scheduler.set_timesteps(4)
    sigmas = [float(t) / 1000 for t in pipe.scheduler.timesteps]  # the 4 steps' sigmas, noisiest first
    guided = run(guidance_scale=3.0)
    assert batches == [4] * 4  # conditional and null caption together at every step
    # an interval holding every step is plain guidance
    assert torch.equal(run(guidance_scale=3.0, guidance_interval=(0.0, 1.0)), guided)
    # an interval holding none is the conditional prediction alone, one pass per step
    plain = run(guidance_scale=1.0)
    below = run(guidance_scale=3.0, guidance_interval=(0.0, min(sigmas) / 2))
    assert batches == [2] * 4
    torch.testing.assert_close(below, plain, rtol=0, atol=1e-5)
    # between them: guided (two passes) exactly at the steps inside, and an image unlike both
    lo, hi = sigmas[2] - 1e-3, sigmas[1] + 1e-3
    mixed = run(guidance_scale=3.0, guidance_interval=(lo, hi))
    assert batches == [2, 4, 4, 2]
    assert (mixed - guided).abs().max() > 1e-3 and (mixed - plain).abs().max() > 1e-3
    for bad in [(0.8, 0.3), (-0.1, 0.5), (0.2, 1.5), ("a", "b"), (0.5,)]:
        with pytest.raises(SemrouteError, match="guidance interval"):
            run(guidance_scale=3.0, guidance_interval=bad)
    # the CLI: the option, a clean error for a bad one, and a folder made with another interval refused
    out = tmp_path / "interval"
    run_cli("sample", "-c", str(trained_run), "-o", str(out), "-p", "a red square", "--steps", "2",
            "--guidance-interval", "0.3,0.8", "--no-progress")
    assert json.loads((out / "sample_run.json").read_text())["guidance_interval"] == [0.3, 0.8]
    bad = run_cli("sample", "-c", str(trained_run), "-o", str(tmp_path / "bad"), "-p", "a red square",
                  "--guidance-interval", "0.8,0.3", "--no-progress", check=False)
    assert bad.returncode != 0 and "guidance interval 0.8,0.3" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    again = run_cli("sample", "-c", str(trained_run), "-o", str(out), "-p", "a red square", "--steps", "2",
                    "--no-progress", check=False)
    assert again.returncode != 0 and "guidance_interval" in again.stderr + again.stdout


def test_a_different_llm_is_refused(trained_run, tiny_qwen_dir, tmp_path):
    with pytest.raises(SemrouteError, match="is not the one the text cache was encoded with"):
        SemroutePipeline.from_run(trained_run, llm=str(tiny_qwen_dir), device="cpu")


def test_sample_geneval_layout_resume_and_seeds(trained_run, tmp_path):
    lines = GENEVAL.read_text().splitlines()[:5]
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "geneval"
    cfg = SampleConfig(checkpoint=str(trained_run), out=str(out), prompts_file=str(prompts), n=2, steps=3,
                       guidance=2.0, seed=11, batch_size=3, progress=False)
    first = sample(cfg)
    assert first["format"] == "geneval" and first["images_written"] == 10
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [f"{i:05d}" for i in range(5)]
    for i, name in enumerate(folders):
        meta = (out / name / "metadata.jsonl").read_text().strip().splitlines()
        assert len(meta) == 1 and json.loads(meta[0]) == json.loads(lines[i])
        assert sorted(p.name for p in (out / name / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert (out / "grid.png").exists()
    # resume: remove one image; only that prompt is sampled again, and it comes back identical
    target = out / "00003" / "samples" / "0001.png"
    before = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(target))
    target.unlink()
    again = sample(cfg)
    assert again["images_written"] == 2 and again["skipped_prompts_done"] == 4
    after = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(target))
    assert np.array_equal(before, after)


def test_two_processes_split_prompts_without_collisions(trained_run, tmp_path):
    out = tmp_path / "split"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(CLI), "sample",
         "-c", str(trained_run), "-o", str(out), "--steps", "2", "--no-progress",
         *[arg for i in range(5) for arg in ("-p", f"a red square number {i}")]],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "sample_run.json").read_text())
    assert record["world_size"] == 2 and sorted(record["images_written_per_process"]) == [2, 3]
    assert sorted(p.name for p in out.glob("*.png") if p.name != "grid.png") == [f"{i:05d}_0.png" for i in range(5)]
    index = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] if "prompt" in r else r["text"] for r in index] == [f"a red square number {i}" for i in range(5)]


def test_routing_command_writes_heatmap_and_csv(trained_run, tmp_path):
    run_cli("routing", str(trained_run), "--out", str(tmp_path))
    rows = (tmp_path / "routing.csv").read_text().splitlines()
    assert rows[0] == "fusion,sigma,block,llm_layer,weight" and len(rows) == 1 + 2 * 4
    assert (tmp_path / "routing.png").stat().st_size > 2000


def test_demo_end_to_end_at_a_tiny_size(tmp_path, smollm2_llm, monkeypatch):
    from semroute.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), images=36, heldout=6, samples_per_prompt=1, train_minutes=5,
                     max_steps=3, batch_size=8, processes=2, sample_steps=2, num_workers=0, progress=False)
    report = run_demo(cfg, llm=smollm2_llm)  # trains through `accelerate launch`, 2 processes of batch 4
    out = Path(cfg.out)
    for name in ("grid.png", "routing.png", "routing.csv", "report.json", "results.jsonl", "report.html",
                 "demo_settings.json"):
        assert (out / name).exists(), name
    assert (out / "run-depth" / "samples" / "step-0000003.png").exists()  # validated at the end
    assert "samples at step 3" in (out / "report.html").read_text()
    assert report["train_steps"] == 3
    assert json.loads((out / "run-depth" / "run.json").read_text())["world_size"] == 2
    assert report["samples"]["n_images"] == 6 and set(report["samples"]["per_tag"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert report["ground_truth"]["overall"] == 1.0
    # sampled (and validated) with the demo's guidance interval
    assert json.loads((out / "samples" / "sample_run.json").read_text())["guidance_interval"] == [0.3, 0.8]
    import yaml

    assert yaml.safe_load((out / "run-depth" / "config.yaml").read_text())["val_guidance_interval"] == [0.3, 0.8]
    fp = TextCacheReader(out / "captions.text.zarr").fingerprint
    assert fp["llm_ref"] == "smollm2" and len(fp["layers"]) == 30

    # A training stopped before its budget (no marker beside the run) is resumed by a rerun, not reported as done.
    import semroute.demo as demo

    marker = out / "run-depth.trained.json"
    assert json.loads(marker.read_text())["step"] == 3
    marker.unlink()
    launched = []
    real_launch = demo.launch_training

    def launch(*args, **kwargs):
        launched.append(kwargs.get("resume"))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(demo, "launch_training", launch)
    again = run_demo(cfg, llm=smollm2_llm)
    assert launched == ["latest"] and again["train_steps"] == 3 and marker.exists()
    launched.clear()
    run_demo(cfg, llm=smollm2_llm)  # trained (marker there): reused, nothing launched
    assert launched == []


def test_info_describes_a_run_folder(trained_run):
    info = json.loads(run_cli("info", str(trained_run), "--json").stdout)
    assert info["kind"] == "training run" and info["fusion"] == "depth" and info["steps done"] == 6
    assert info["checkpoints"] == "step-0000006"
