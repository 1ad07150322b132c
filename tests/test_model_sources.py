"""How stage 2 reads what it loads: an autoencoder's downsampling factor and latent scale (one rule for both
stages), JSON files (one reader naming the file and the fix), the classes an export's model_index.json may name,
and what a path given to sample/export/routing/info is (run_folder.resolve_model_source)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.vae import PixelCodec, describe_vae, downsample_factor
from semroute.stage2_train import checkpoint_files
from semroute.stage2_train.pipeline import SemroutePipeline, _vae_from_fingerprint, export_pipeline
from semroute.stage2_train.run_folder import (CHECKPOINT, EXPORT, RUN, RunFolder, open_model,
                                              resolve_model_source)
from semroute.stage2_train.sampling import RECORD, SampleConfig, sample
from testkit import copy_run, write_manifest, write_square_images


def _tiny_dc_ae(folder: Path) -> Path:
    """A random 2-block diffusers AutoencoderDC (downsampling 2, 4 latent channels, scaling 0.5), saved."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_out_channels=(8, 16),
                  decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                  encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                  scaling_factor=0.5).save_pretrained(folder)
    return folder


# -- the downsampling factor and latent scale: one rule for encode-images and sampling -------------------------
def test_a_dc_ae_cache_samples_at_the_factor_it_was_encoded_with(tmp_path):
    """DC-AE's config states its factor only as encoder_block_out_channels: encode-images read 2 from it, and the
    pipeline (sample, training validation) must read the same, and map latents back with the same scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from semroute.shared.latent_store import LatentCacheReader
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    vae_dir = _tiny_dc_ae(tmp_path / "dcae")
    assert describe_vae(str(vae_dir)).downsample == 2
    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 2, size=16))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(tmp_path / "l.zarr"), vae=str(vae_dir), resolution=16,
                                     device="cpu", workers=0, progress=False))
    reader = LatentCacheReader(tmp_path / "l.zarr")
    assert reader.attrs["downsample"] == 2 and reader.scaling_factor == 0.5
    vae, size = _vae_from_fingerprint(reader.fingerprint)
    pipe = SemroutePipeline(None, vae, FlowMatchEulerDiscreteScheduler())
    pipe.default_size = size
    assert pipe.vae_downsample == 2 and pipe.image_size() == (16, 16)
    raw = reader.stored(0)["latent"][None].float()  # [1, 4, 8, 8] as the autoencoder gave it
    decoded = pipe.decode_latents(reader.latent(0)[None])  # from the DiT's space
    with torch.no_grad():
        expected = ((vae.decode(raw).sample.clamp(-1, 1) + 1) / 2)
    assert decoded.shape == (1, 3, 16, 16)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config, factor", [
    ({"spatial_compression_ratio": 32, "encoder_block_out_channels": [8, 16]}, 32),
    ({"block_out_channels": [8, 16, 32, 32]}, 8),
    ({"encoder_block_out_channels": [8, 16, 32]}, 4),
    ({"latent_channels": 4}, 0),  # not stated: encode-images measures it
])
def test_downsample_factor_of_a_config(config, factor):
    assert downsample_factor(config) == factor
    assert downsample_factor(PixelCodec(4)) == 4


# -- JSON files: one reader, naming the file and the fix --------------------------------------------------
DAMAGES = {"cut short": lambda b: b[: len(b) // 2], "a list": lambda b: b"[1]", "not UTF-8": lambda b: b"\xff\xfe" + b}
NAMED = r"(malformed JSON|expected a JSON object, got a list|not UTF-8 text)"


def _damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGES[how](path.read_bytes()))


def _unlisted_copy(tmp_path: Path, run4: Path, exported: Path, kind: str) -> tuple[Path, Path]:
    """A run (its newest checkpoint without complete.json, as one written before it existed) or an export (the
    same), and the model config.json a loader reads there."""
    if kind == "run":
        run = copy_run(run4, tmp_path)
        ckpt = run / "checkpoints" / "step-0000004"
        (ckpt / checkpoint_files.MANIFEST).unlink()
        return run, ckpt / "model" / "config.json"
    pipe = tmp_path / "pipe"
    shutil.copytree(exported, pipe)
    (pipe / checkpoint_files.MANIFEST).unlink()
    return pipe, pipe / "transformer" / "config.json"


@pytest.mark.parametrize("how", list(DAMAGES))
@pytest.mark.parametrize("kind", ["run", "export"])
def test_a_damaged_model_config_is_one_named_error_for_routing_and_sample(run4, exported, tmp_path, kind, how):
    path, config = _unlisted_copy(tmp_path, run4, exported, kind)
    _damage(config, how)
    with pytest.raises(SemrouteError, match=rf"{config}.*{NAMED}.*the model folder is damaged"):
        open_model(path)  # semroute routing PATH
    out = tmp_path / "samples"
    with pytest.raises(SemrouteError, match=rf"{config.name}.*{NAMED}.*the model folder is damaged"):
        sample(SampleConfig(checkpoint=str(path), out=str(out), prompts=["a red square"], steps=1, progress=False,
                            device="cpu", grid=False))
    assert not (out / RECORD).exists()



@pytest.mark.parametrize("kind", ["run", "export"])
def test_a_deleted_weights_file_without_complete_json_is_one_named_error(run4, exported, tmp_path, kind):
    path, config = _unlisted_copy(tmp_path, run4, exported, kind)
    for weights in config.parent.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(SemrouteError, match=rf"^{config.parent}: cannot load the model \(.*\); the model folder is "
                                            "damaged"):
        open_model(path)  # semroute routing PATH

def test_routing_checks_an_export_against_its_manifest(exported, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(exported, pipe)
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # loads without complaint: only the manifest can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(SemrouteError, match=rf"exported pipeline {pipe} is damaged: .*{weights.name}.*export it again"):
        open_model(pipe)


def _demo_marker(tmp_path: Path) -> Path:
    from semroute.demo import trained_marker

    marker = trained_marker(tmp_path / "run-depth")
    marker.write_text(json.dumps({"step": 3, "train_seconds": 1.0, "validation_seconds": 0.0}) + "\n")
    return marker


def _read_demo_marker(marker: Path):
    from semroute.demo import DemoConfig, train_strategy

    return train_strategy(DemoConfig(out=str(marker.parent)), {}, "depth", marker.parent / "run-depth")


def _report_json(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "report.json"
    path.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "samples": {}}))
    return path


def _vae_config(tmp_path: Path) -> Path:
    PixelCodec(2).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    return tmp_path / "vae" / "config.json"


def _shard_index(tmp_path: Path) -> Path:
    (tmp_path / "llm").mkdir()
    path = tmp_path / "llm" / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"model.layers.0.input_layernorm.weight": "a.safetensors"}}))
    return path


def _train_state(tmp_path: Path) -> Path:
    path = tmp_path / "step-0000001" / "train_state.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"step": 1}))
    return path


SITES = {
    # (write the intact file, read it as the code does)
    "demo marker": (_demo_marker, _read_demo_marker),
    "demo report beside a run": (_report_json, lambda p: __import__(
        "semroute.stage2_train.report", fromlist=["_checker_scores"])._checker_scores(p.parent)),
    "--vae config.json": (_vae_config, lambda p: describe_vae(str(p.parent))),
    "pixel codec config.json": (lambda t: PixelCodec(2).save_pretrained(t / "vae") or t / "vae" / "config.json",
                                lambda p: PixelCodec.from_pretrained(p.parent)),
    "LLM shard index": (_shard_index, lambda p: __import__(
        "semroute.stage2_train.llm_layers", fromlist=["_safetensors_key_map"])._safetensors_key_map(p.parent)),
    "checkpoint train_state.json": (_train_state, lambda p: RunFolder.train_state(p.parent)),
}


@pytest.mark.parametrize("how", list(DAMAGES))
@pytest.mark.parametrize("site", list(SITES))
def test_each_json_file_read_names_its_damage(tmp_path, site, how):
    write, read = SITES[site]
    path = write(tmp_path)
    read(path)  # intact: read as before
    _damage(path, how)
    with pytest.raises(SemrouteError, match=rf"{path}.*{NAMED}[^;]*; \S"):
        read(path)


# -- model_index.json names only classes semroute writes ------------------------------------------------
PLANTED = '''from pathlib import Path
Path(__file__).with_name("imported").write_text("yes")

class Planted:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()
'''


def _listed_copy(exported: Path, pipe: Path, index_change: dict) -> Path:
    """A copy of the export with model_index.json changed and complete.json written again: a folder from
    elsewhere that is whole, whatever it names."""
    shutil.copytree(exported, pipe)
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, **index_change}))
    checkpoint_files.write_manifest(pipe, 4)
    return pipe


@pytest.mark.parametrize("component", ["transformer", "vae", "scheduler"])
def test_an_export_naming_another_class_is_refused_and_its_module_never_imported(exported, tmp_path, monkeypatch,
                                                                                 component):
    (tmp_path / "planted_module.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    pipe = _listed_copy(exported, tmp_path / "pipe", {component: ["planted_module", "Planted"]})
    with pytest.raises(SemrouteError, match=rf"{pipe}/model_index.json: {component} is \[\"planted_module\", "
                                            r"\"Planted\"\], not a class semroute writes there .*refusing to load it"):
        SemroutePipeline.from_pretrained(pipe, device="cpu")
    assert not (tmp_path / "imported").exists()


def test_an_export_of_another_pipeline_class_is_refused(exported, tmp_path):
    pipe = _listed_copy(exported, tmp_path / "pipe", {"_class_name": "StableDiffusionPipeline"})
    with pytest.raises(SemrouteError, match=r"describes a 'StableDiffusionPipeline' pipeline, not a SemroutePipeline"):
        SemroutePipeline.from_pretrained(pipe, device="cpu")


def test_a_diffusers_autoencoder_named_in_the_index_is_looked_up_in_diffusers(tmp_path):
    from diffusers import AutoencoderDC

    from semroute.stage2_train.pipeline import _index_class

    index = {"vae": ["diffusers.models.autoencoders.autoencoder_dc", "AutoencoderDC"]}
    assert _index_class(tmp_path / "model_index.json", index, "vae") is AutoencoderDC
    with pytest.raises(SemrouteError, match="vae is .*AutoencoderNope"):
        _index_class(tmp_path / "model_index.json", {"vae": ["diffusers", "AutoencoderNope"]}, "vae")


# -- what a path is: one rule for sample, export, routing and info ---------------------------------------
def test_resolve_model_source_tells_each_kind(run4, exported, tmp_path):
    ckpt = run4 / "checkpoints" / "step-0000004"
    found = {p: resolve_model_source(p) for p in (run4, ckpt, exported, tmp_path)}
    assert (found[run4].kind, found[run4].run.path, found[run4].checkpoint) == (RUN, run4, None)
    assert (found[ckpt].kind, found[ckpt].run.path, found[ckpt].checkpoint) == (CHECKPOINT, run4, ckpt)
    assert (found[exported].kind, found[exported].run) == (EXPORT, None)
    assert found[tmp_path] is None
    moved = tmp_path / "moved" / "step-0000004"
    shutil.copytree(ckpt, moved)
    source = resolve_model_source(moved)
    assert source.kind == CHECKPOINT and source.run is None and source.model_dir() == moved / "model"
    for only in ("run.json", "config.yaml"):  # train writes both together: either marks a run
        half = tmp_path / f"only-{only}"
        half.mkdir()
        (half / only).write_text("{}")
        assert resolve_model_source(half).kind == RUN


def test_sample_names_a_checkpoint_moved_out_of_its_run_as_such(run4, tmp_path):
    moved = tmp_path / "moved" / "step-0000004"
    shutil.copytree(run4 / "checkpoints" / "step-0000004", moved)
    open_model(moved)  # routing needs only the model
    with pytest.raises(SemrouteError, match=r"a checkpoint folder outside its run \(no run.json two levels up\)"):
        sample(SampleConfig(checkpoint=str(moved), out=str(tmp_path / "s"), prompts=["a red square"], steps=1,
                            progress=False, device="cpu", grid=False))
    with pytest.raises(SemrouteError, match="is not a run folder or one of its checkpoints"):
        export_pipeline(moved, tmp_path / "pipe")


def test_a_folder_without_model_index_is_no_export_for_routing_either(exported, tmp_path):
    """sample always required an export's model_index.json; routing took any folder with transformer/config.json."""
    pipe = tmp_path / "pipe"
    shutil.copytree(exported / "transformer", pipe / "transformer")
    for load in (open_model, lambda p: sample(SampleConfig(checkpoint=str(p), out=str(tmp_path / "s"),
                                                           prompts=["a red square"], steps=1, progress=False,
                                                           device="cpu", grid=False))):
        with pytest.raises(SemrouteError, match="not a run folder, a checkpoint( folder)? or an exported pipeline"):
            load(pipe)


def test_info_describes_only_run_folders_and_names_a_missing_config(run4, tmp_path):
    from typer.testing import CliRunner

    from semroute.cli import app

    half = tmp_path / "half"
    half.mkdir()
    shutil.copyfile(run4 / "run.json", half / "run.json")
    result = CliRunner().invoke(app, ["info", str(half)])
    assert isinstance(result.exception, SemrouteError) and "no config.yaml" in str(result.exception)
    result = CliRunner().invoke(app, ["info", str(run4), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "training run"
