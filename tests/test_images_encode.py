"""``encode-images`` end to end, in process: what is stored equals a direct VAE encode, pixel codec round
trip, bad images, buckets, fingerprints on --resume, --estimate, info and verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from images_testutil import png_header_only, random_rgb, tiny_vae, write_images, write_manifest
from PIL import Image
from typer.testing import CliRunner

from semroute.cli import app
from semroute.shared import images as im
from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.vae import PixelCodec, load_encoder, pixels_to_unit, unit_to_pixels


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, ["encode-images", *map(str, args), "--no-progress"])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.exception!r}") from result.exception
    return result


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture()
def data(tmp_path) -> Path:
    write_manifest(tmp_path / "data.jsonl", write_images(tmp_path / "imgs", 10))
    return tmp_path / "data.jsonl"


def test_stored_posterior_equals_direct_vae_encode(tmp_path, data, vae_dir):
    out = tmp_path / "c.latents.zarr"
    run(data, "--vae", vae_dir, "--out", out, "--resolution", 32, "--image-root", tmp_path / "imgs",
        "--batch-size", 4, "--workers", 2, "--shard-mb", 0.02, "--device", "cpu")
    reader = LatentCacheReader(out)
    assert len(reader) == 10 and reader.index.num_rows == 10  # one row per image, not per caption
    assert reader.sample_ids == [f"s{i}" for i in range(10)]  # the manifest ids, which join the text cache
    assert (reader.scaling_factor, reader.shift_factor, reader.latent_channels) == (0.5, 0.1, 4)
    fp = reader.fingerprint
    assert fp["class"] == "AutoencoderKL" and len(fp["weights_sha256"]) == 64 and fp["resolution"] == 32
    assert reader.attrs["world_size"] == 1

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    opts = im.ImageOptions(resolution=32)
    pixels = torch.stack([torch.from_numpy(im.load_image(str(tmp_path / "imgs" / f"img{i:04d}.jpg"), opts)[0])
                          for i in range(10)])
    with torch.no_grad():
        # The run encodes batches of 4 from each shard's start; encode the same batches directly.
        for start in range(0, 10, 4):
            dist = vae.encode(pixels_to_unit(pixels[start:start + 4])).latent_dist
            for j in range(dist.mean.shape[0]):
                mean, logvar = reader.posterior(start + j)
                assert mean.shape == (4, 16, 16)
                assert torch.equal(mean, dist.mean[j]) and torch.equal(logvar, dist.logvar[j])
    # A single-image encode agrees to float rounding (batching may change the last bits on CPU).
    with torch.no_grad():
        one = vae.encode(pixels_to_unit(pixels[5:6])).latent_dist.mean[0]
    assert torch.allclose(reader.posterior(5)[0], one, atol=1e-5)


def test_pixel_codec_round_trips_exactly(tmp_path):
    img = random_rgb(64, 48, seed=3)
    img.save(tmp_path / "a.png")
    write_manifest(tmp_path / "d.jsonl", [{"image": str(tmp_path / "a.png"), "text": "x"}])
    out = tmp_path / "p.latents.zarr"
    run(tmp_path / "d.jsonl", "--vae", "pixel", "--out", out, "--resolution", 48, "--workers", 0)
    reader = LatentCacheReader(out)
    z = reader.latent(0)  # exact: no sampling, factors 1 and 0
    assert z.shape == (12, 24, 24) and reader.attrs["stored_dtype"] == "uint8"
    codec = PixelCodec(2)
    decoded = unit_to_pixels(codec.decode(z[None]).sample)[0]
    expect = im.load_image(str(tmp_path / "a.png"), im.ImageOptions(resolution=48))[0]
    assert torch.equal(decoded, torch.from_numpy(expect))
    # The float path and the uint8-code path agree bit for bit, and decode inverts encode.
    x = pixels_to_unit(torch.from_numpy(expect)[None])
    assert torch.equal(codec.encode(x).latent, pixels_to_unit(codec.encode_codes(torch.from_numpy(expect)[None])))
    assert torch.equal(codec.decode(codec.encode(x).latent).sample, x)
    codec.save_pretrained(tmp_path / "codec")
    assert PixelCodec.from_pretrained(tmp_path / "codec").config == codec.config


def test_bad_images_are_reported_and_left_out(tmp_path, capsys):
    root = tmp_path / "imgs"
    recs = write_images(root, 3)
    random_rgb(64, 64, 0).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    random_rgb(4, 30, 0).save(root / "tiny.png")
    png_header_only(root / "bomb.png", 30000, 30000)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    for name in ["cut.jpg", "empty.png", "notes.jpg", "tiny.png", "bomb.png", "missing.png", "cmyk.jpg"]:
        recs.append({"id": name, "image": name, "text": "c"})
    manifest = write_manifest(tmp_path / "d.jsonl", recs)
    with manifest.open("a") as fh:
        fh.write("{not json\n")
    out = tmp_path / "c.latents.zarr"
    result = run(manifest, "--vae", "pixel", "--out", out, "--resolution", 32, "--image-root", root,
                 "--skip-bad", "--workers", 0, "--shard-mb", 0.01)
    expect = {"cut.jpg": "truncated", "empty.png": "zero-byte", "notes.jpg": "not an image", "tiny.png": "too small",
              "bomb.png": "decompression bomb", "missing.png": "missing"}
    report = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {e["sample_id"]: e["status"] for e in report if "sample_id" in e} == expect
    assert any("malformed JSON" in e["reason"] and e["line"] == 11 for e in report)
    for e in report:
        assert e["path"] and e["reason"]
    console = result.output + capsys.readouterr().err
    for name in expect:
        assert name in console  # every skipped image is named on the console too
    assert "4 encoded, 6 skipped, 1 bad manifest records" in result.output
    reader = LatentCacheReader(out)
    assert reader.sample_ids == ["s0", "s1", "s2", "cmyk.jpg"]  # no stand-in for any bad image
    red = unit_to_pixels(PixelCodec(2).decode(reader.latent(3)[None]).sample)[0].float().mean((1, 2))
    assert red[0] > 240 and red[1] < 15  # the CMYK JPEG arrived as red RGB


def test_buckets_store_each_shape_apart(tmp_path):
    root = tmp_path / "imgs"
    recs = write_images(root, 8, sizes=((64, 32), (32, 64), (40, 40), (70, 30)))
    manifest = write_manifest(tmp_path / "d.jsonl", recs)
    out = tmp_path / "b.latents.zarr"
    run(manifest, "--vae", "pixel", "--out", out, "--resolution", 32, "--image-root", root,
        "--buckets", "48x24,32x32,24x48", "--workers", 0)
    reader = LatentCacheReader(out)
    groups = {k: [reader.sample_ids[i] for i in v] for k, v in reader.by_bucket().items()}
    assert groups == {"24x48": ["s1", "s5"], "32x32": ["s2", "s6"], "48x24": ["s0", "s3", "s4", "s7"]}
    assert reader.latent(reader.position("s0")).shape == (12, 12, 24)
    assert reader.latent(reader.position("s1")).shape == (12, 24, 12)
    index = reader.index.to_pylist()
    assert index[0]["bucket"] == "48x24" and index[0]["crop_x0"] == 0.0 and index[0]["orig_width"] == 64
    assert reader.fingerprint["crop"] == "buckets"


def test_resume_refuses_another_fingerprint(tmp_path, data, vae_dir):
    out = tmp_path / "c.latents.zarr"
    common = ["--out", out, "--image-root", tmp_path / "imgs", "--workers", 0]
    run(data, "--vae", vae_dir, "--resolution", 32, *common)
    again = run(data, "--vae", vae_dir, "--resolution", 32, *common, ok=False)
    assert isinstance(again.exception, SemrouteError) and "--resume" in str(again.exception)
    other_res = run(data, "--vae", vae_dir, "--resolution", 16, *common, "--resume", ok=False)
    assert isinstance(other_res.exception, FingerprintMismatch)
    assert "resolution: cache has 32, expected 16" in str(other_res.exception)
    other_vae = tiny_vae(tmp_path / "vae2", seed=1)
    changed = run(data, "--vae", other_vae, "--resolution", 32, *common, "--resume", ok=False)
    assert isinstance(changed.exception, FingerprintMismatch) and "weights_sha256" in str(changed.exception)
    pixel = run(data, "--vae", "pixel", "--resolution", 32, *common, "--resume", ok=False)
    assert "vae: cache has" in str(pixel.exception)
    # The same settings resume fine (nothing left to do) and keep the store.
    done = run(data, "--vae", vae_dir, "--resolution", 32, *common, "--resume")
    assert "resumed: " in done.output


def test_estimate_is_exact(tmp_path, data, vae_dir):
    out = tmp_path / "c.latents.zarr"
    common = [data, "--vae", vae_dir, "--out", out, "--resolution", 32, "--image-root", tmp_path / "imgs",
              "--shard-mb", 0.05, "--workers", 0]
    est = run(*common, "--estimate")
    assert not out.exists()
    total = int(est.output.split("arrays")[1].split("(")[1].split(" bytes")[0])
    run(*common)
    arrays = sum(p.stat().st_size for p in (out / "buckets").rglob("*") if p.is_file() and "zarr.json" not in p.name)
    assert arrays == total


def test_info_and_verify_find_a_flipped_byte(tmp_path, data):
    out = tmp_path / "c.latents.zarr"
    run(data, "--vae", "pixel", "--out", out, "--resolution", 32, "--image-root", tmp_path / "imgs",
        "--shard-mb", 0.01, "--workers", 0)
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "latent cache" in info.output and "32x32" in info.output
    assert json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)["images encoded"] == 10
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    shard = sorted(p for p in (out / "buckets" / "32x32" / "latent" / "c").rglob("*") if p.is_file())[1]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code != 0 and str(shard) in bad.output and "crc32c" in bad.output


def test_vae_loading_reports_problems(tmp_path, vae_dir):
    enc = load_encoder(str(vae_dir), device="cpu")
    assert enc.arrays == ("mean", "logvar") and enc.info.downsample == 2 and enc.info.latent_channels == 4
    out = enc.encode(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert out["mean"].shape == (2, 4, 4, 4)
    pipeline = tmp_path / "pipe"
    tiny_vae(pipeline / "vae")
    with pytest.raises(SemrouteError, match="--vae-subfolder vae"):
        load_encoder(str(pipeline))
    assert load_encoder(str(pipeline), "vae").info.identity["subfolder"] == "vae"
    with pytest.raises(SemrouteError, match="not divisible"):
        enc.info.latent_shape(33, 32)
    assert np.isfinite(out["logvar"].numpy()).all()


def test_auto_device_under_several_processes_is_each_process_s_own(tmp_path, data, monkeypatch):
    """``--device ""`` is auto: under several processes each loads its autoencoder on its own device."""
    from semroute.shared.distributed import ProcessInfo
    from semroute.stage1_encode import images as images_mod

    own = torch.device("meta")
    monkeypatch.setattr(images_mod, "load_encoder", lambda *a, device, **kw: device)
    proc = ProcessInfo(1, 2, own)
    monkeypatch.setattr(proc, "broadcast", lambda obj: ("ok", True))  # rank 0's checks before the load passed
    for auto in ("auto", ""):
        run_ = images_mod.EncodeImagesRun(images_mod.EncodeImagesConfig(
            data=str(data), out=str(tmp_path / "c.latents.zarr"), vae="pixel", device=auto, progress=False), proc)
        assert str(run_._load_encoder()) == str(own), auto


def test_a_vae_folder_without_weights_is_one_error_naming_it(tmp_path):
    """diffusers' OSError ("no file named diffusion_pytorch_model.bin") carries no file name: named with --vae."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(SemrouteError, match=r"--vae .*vae: cannot load AutoencoderKL from .*vae \(OSError: "):
        load_encoder(str(folder), device="cpu")
