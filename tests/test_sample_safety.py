"""``sample`` and ``export`` keep what is on disk safe: an output folder never mixes runs (other prompts
included) and is claimed only once every check passed; an export is checked against its manifest when
loaded, never replaces a folder that is not an earlier export, and never leaves a half export; the LLM
loads from any working directory; bad devices, over-long prompts and ignored options are named."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train import checkpoint_files
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.pipeline import PromptTruncated, SemroutePipeline, export_pipeline
from semroute.stage2_train.sampling import RECORD, SampleConfig, sample
from semroute.stage2_train.train import train
from testkit import run_cli, write_manifest, write_square_images


@pytest.fixture(scope="module")
def run2(square_caches, tmp_path_factory) -> Path:
    text, latents, _ = square_caches
    out = tmp_path_factory.mktemp("sample_safety") / "run"
    train(TrainConfig(text_cache=text, latent_cache=latents, out=str(out), preset="tiny", batch_size=8,
                      num_workers=0, report_to="none", max_steps=2, checkpoint_every=2), progress=False)
    return out


@pytest.fixture(scope="module")
def exported(run2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "pipe"
    export_pipeline(run2, out)
    return out


def _base(run: Path, out: Path, **kw) -> SampleConfig:
    return SampleConfig(**{**dict(checkpoint=str(run), out=str(out), prompts=["a red square on the left"], steps=1,
                                  progress=False, device="cpu", grid=False), **kw})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- B6: other prompts into the same -o --------------------------------------------------------------
def test_other_prompts_into_the_same_folder_are_refused_and_nothing_is_touched(run2, tmp_path):
    out = tmp_path / "s"
    first = ["a red square on the left", "a blue square on the right"]
    assert sample(_base(run2, out, prompts=first))["images_written"] == 2
    before = _snapshot(out)
    for prompts in (["a green square on the left", "a blue square on the right"], first[:1], [*first, "a star"]):
        with pytest.raises(SemrouteError, match=r"holds images made with other settings \(prompts 2 prompts .* -> "
                                                rf"{len(prompts)} prompts.*sample into another -o"):
            sample(_base(run2, out, prompts=prompts))
        assert _snapshot(out) == before
    # the same prompts again: a resume with nothing left to do
    assert sample(_base(run2, out, prompts=first))["images_written"] == 0
    # a record from before prompts were recorded cannot vouch for the images: refused, kept
    record = json.loads((out / RECORD).read_text())
    del record["prompts"]
    (out / RECORD).write_text(json.dumps(record))
    before = _snapshot(out)
    with pytest.raises(SemrouteError, match="did not record its prompts"):
        sample(_base(run2, out, prompts=first))
    assert _snapshot(out) == before


def test_a_geneval_folder_holding_only_metadata_is_not_claimed_for_other_prompts(run2, tmp_path, monkeypatch):
    """A run killed between a prompt's metadata.jsonl and its first image leaves metadata and no image: another
    prompt set claimed that folder, and GenEval's scorer then read one set's metadata beside the other's."""
    import semroute.stage2_train.sampling as sampling_mod

    def prompt_file(name: str, prompts: list[str]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": "square", "count": 1}],
                                            "prompt": p}) + "\n" for p in prompts))
        return str(path)

    first = prompt_file("a.jsonl", ["a red square", "a blue square"])
    other = prompt_file("b.jsonl", ["a green square", "a yellow square"])
    out = tmp_path / "s"

    def killed(image, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling_mod, "save_image", killed)
    with pytest.raises(KeyboardInterrupt):
        sample(_base(run2, out, prompts=[], prompts_file=first))
    monkeypatch.undo()
    before = _snapshot(out)
    assert sorted(before) == ["00000/metadata.jsonl", RECORD]
    with pytest.raises(SemrouteError, match=rf"{out} holds prompt metadata \(00000/metadata.jsonl, no images yet\) "
                                            r"made with other settings \(prompts 2 prompts .*sample into another -o"):
        sample(_base(run2, out, prompts=[], prompts_file=other))
    assert _snapshot(out) == before
    # without its record nothing says which prompts the metadata is for: refused for any prompts
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / RECORD).unlink()
    for prompts in (first, other):
        with pytest.raises(SemrouteError, match=rf"-o {bare} holds prompt metadata \(00000/metadata.jsonl, no images "
                                                rf"yet\) but no {RECORD} .*sample into another -o"):
            sample(_base(run2, bare, prompts=[], prompts_file=prompts))
    assert _snapshot(bare) == {"00000/metadata.jsonl": before["00000/metadata.jsonl"]}
    # the same prompts resume, other settings allowed as before any image (here another seed)
    assert sample(_base(run2, out, prompts=[], prompts_file=first, seed=5))["images_written"] == 2
    assert [json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())["prompt"] for i in range(2)] == \
        ["a red square", "a blue square"]


# -- B12: nothing is claimed before every check ---------------------------------------------------
def test_a_refused_size_claims_nothing_and_the_corrected_rerun_works(run2, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(SemrouteError, match="multiples of 2"):
        sample(_base(run2, out, resolution=31))
    assert not (out / RECORD).exists()
    assert sample(_base(run2, out, resolution=32))["images_written"] == 1


# -- B11: a device the machine lacks ----------------------------------------------------------------
@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta", *([] if torch.cuda.is_available() else ["cuda"])])
def test_a_bad_device_is_a_clean_error_before_anything_is_written(run2, tmp_path, device):
    out = tmp_path / "s"
    with pytest.raises(SemrouteError, match=rf"--device {device}"):
        sample(_base(run2, out, device=device))
    assert not out.exists()


# -- B16: prompts longer than the cache's max_length --------------------------------------------------
def test_an_overlong_prompt_is_warned_about(run2, tmp_path, capsys):
    prompts = ["a red square", " ".join(["red square"] * 400)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = sample(_base(run2, tmp_path / "s", prompts=prompts))
    err = capsys.readouterr().err
    assert summary["images_written"] == 2 and summary["truncated_prompts"] == 1
    assert "warning: prompt 1 has" in err and "max_length 512" in err and "prompt 0" not in err
    assert not [w for w in caught if issubclass(w.category, PromptTruncated)]  # named once, with its line


def test_the_pipeline_used_directly_warns_about_an_overlong_prompt(run2):
    from semroute.stage2_train.sampling import load_pipeline

    pipe = load_pipeline(run2, device="cpu")
    prompts = ["a red square", " ".join(["red square"] * 400)]
    with pytest.warns(PromptTruncated, match=r"1 of 2 prompts .* max_length 512 .*: prompt 1 \(\d+ tokens\)$"):
        feats = pipe.encode_prompts(prompts)
    assert feats[1].shape[0] == 512
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncated)
        pipe.encode_prompts(prompts[:1])  # no warning for prompts that fit


def test_a_prompt_that_is_not_utf8_is_named(run2, tmp_path):
    """``-p $'\\xff'``: the shell hands Python a lone surrogate, which the prompts' record met as a traceback."""
    with pytest.raises(SemrouteError, match=r"--prompt 2 holds a lone surrogate '\\udcff'"):
        sample(_base(run2, tmp_path / "s", prompts=["a red square", "\udcff"]))
    assert not (tmp_path / "s").exists()


# -- B15: options that would be silently ignored --------------------------------------------------------
def test_format_with_prompt_flags_is_refused(run2, tmp_path):
    with pytest.raises(SemrouteError, match="--format geneval applies to a --prompts FILE"):
        sample(_base(run2, tmp_path / "s", format="geneval"))
    assert not (tmp_path / "s").exists()


def test_export_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(SemrouteError, match="nosuch is not a run folder"):
        export_pipeline(tmp_path / "nosuch", tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


# -- B7: the export's manifest ----------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "settings"])
def test_a_damaged_export_is_named_when_loaded(exported, tmp_path, damage):
    pipe = tmp_path / "pipe"
    shutil.copytree(exported, pipe)
    listed = json.loads((pipe / checkpoint_files.MANIFEST).read_text())["files"]
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "text/semroute_text.json",
            "text/null.safetensors"} <= set(listed)
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        weights.unlink()
    else:
        weights = pipe / "text" / "semroute_text.json"
        weights.write_text(weights.read_text()[:40])
    with pytest.raises(SemrouteError, match=rf"exported pipeline .*pipe is damaged: .*{weights.name}.*export it again"):
        SemroutePipeline.from_pretrained(pipe, device="cpu")


# -- B8: export never replaces what is not its own, never leaves half an export ---------------------
def test_export_refuses_a_run_folder_and_user_files(run2, tmp_path):
    before = _snapshot(run2)
    with pytest.raises(SemrouteError, match="is not an exported semroute pipeline; refusing to replace it"):
        export_pipeline(run2, run2, overwrite=True)
    assert _snapshot(run2) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my thesis")
    proc = run_cli("export", str(run2), "--out", str(mine), "--overwrite", check=False)
    assert proc.returncode == 1 and "refusing to replace it" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(mine) == {"notes.txt": b"my thesis"}


def test_export_replaces_an_earlier_export_only_when_told(run2, exported, tmp_path, monkeypatch):
    out = tmp_path / "pipe"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    with pytest.raises(SemrouteError, match="already holds an exported pipeline; pass --overwrite"):
        export_pipeline(run2, out)
    assert _snapshot(out) == before
    # a crash while writing: the earlier export stays whole, and no half export is left under any name
    def crash(folder, step):
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint_files, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed"):
        export_pipeline(run2, out, overwrite=True)
    assert _snapshot(out) == before
    with pytest.raises(RuntimeError, match="killed"):
        export_pipeline(run2, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    export_pipeline(run2, out, ema=False, overwrite=True)
    SemroutePipeline.from_pretrained(out, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # the temporary siblings are gone


def test_an_overwrite_killed_between_its_renames_gives_the_earlier_export_back(run2, exported, tmp_path,
                                                                                 monkeypatch):
    import semroute.stage2_train.pipeline as pipeline_mod

    out = tmp_path / "pipe"
    shutil.copytree(exported, out)
    before = _snapshot(out)
    real = os.replace

    def killed_after_the_first(src, dst):
        if str(src).endswith(".export.tmp") and Path(dst) == out.resolve():
            raise KeyboardInterrupt  # the process dies here: the old export moved aside, the new not yet in place
        real(src, dst)

    monkeypatch.setattr(pipeline_mod.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(run2, out, overwrite=True)
    monkeypatch.undo()
    assert not out.exists()
    with pytest.raises(SemrouteError, match="already holds an exported pipeline; pass --overwrite"):
        export_pipeline(run2, out)  # the next export finds the earlier one back under its name
    assert _snapshot(out) == before


# -- B9: the LLM from any working directory ---------------------------------------------------------
def test_a_local_llm_is_recorded_absolute(tmp_path, tiny_llama_dir, monkeypatch):
    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 4))
    shutil.copytree(tiny_llama_dir, tmp_path / "llm")
    monkeypatch.chdir(tmp_path)
    encode_text(EncodeTextConfig(data=str(manifest), out="t.zarr", llm="llm", dtype="float32", device="cpu",
                                 progress=False))
    assert TextCacheReader(tmp_path / "t.zarr").fingerprint["llm_ref"] == str((tmp_path / "llm").resolve())


def test_an_older_relative_llm_reference_says_what_was_tried(exported, tiny_llama_dir, tmp_path, monkeypatch):
    pipe = tmp_path / "pipe"
    shutil.copytree(exported, pipe)
    (pipe / checkpoint_files.MANIFEST).unlink()  # as exported before the manifest (and absolute refs) existed
    settings = json.loads((pipe / "text" / "semroute_text.json").read_text())
    (pipe / "text" / "semroute_text.json").write_text(json.dumps({**settings, "llm_ref": "models/tiny-llama"}))
    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_llama_dir, tmp_path / "models" / "tiny-llama")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SemrouteError, match=r"recorded as 'models/tiny-llama': there is no "
                                            rf"{tmp_path / 'elsewhere' / 'models' / 'tiny-llama'}.*--llm PATH"):
        SemroutePipeline.from_pretrained(pipe, device="cpu")
    # told where it is: loads (same weights), and an export made from it names that absolute path
    loaded = SemroutePipeline.from_pretrained(pipe, llm=str(tiny_llama_dir), device="cpu")
    assert loaded.text_settings["llm_ref"] == str(Path(tiny_llama_dir).resolve())
    monkeypatch.chdir(tmp_path)  # where the relative path holds: it loads
    assert SemroutePipeline.from_pretrained(pipe, device="cpu").text_encoder is not None



@pytest.mark.parametrize("command", ["export", "sample", "routing", "report"])
def test_no_output_inside_a_checkpoint_or_an_export(run2, tmp_path, command):
    """A resume prunes old checkpoints whole, with whatever was written into them (an export there was deleted
    without a word); a checkpoint and an export are also checked against their own list of files."""
    from typer.testing import CliRunner

    from semroute.cli import app

    def cli(*args):
        result = CliRunner().invoke(app, list(args))
        if result.exit_code == 0:
            return None
        assert isinstance(result.exception, SemrouteError), repr(result.exception)
        return str(result.exception)

    run = tmp_path / "run"
    shutil.copytree(run2, run)
    ckpt = sorted((run / "checkpoints").iterdir())[0]
    before = _snapshot(ckpt)
    inside = ckpt / "mine"
    args = {"export": ["export", str(run), "--out", str(inside)],
            "sample": ["sample", "-c", str(run), "-p", "a red square", "--steps", "1", "--device", "cpu",
                       "--no-progress", "-o", str(inside)],
            "routing": ["routing", str(run), "--out", str(inside)],
            "report": ["report", str(run), "--out", str(inside / "r.html")]}[command]
    err = cli(*args)
    assert err and f"{'-o' if command == 'sample' else '--out'} {inside}" in err and "is inside a checkpoint (" in err
    assert _snapshot(ckpt) == before and not inside.exists()
    if command == "export":  # nor inside an export; replacing an earlier export whole stays allowed
        pipe = tmp_path / "pipe"
        assert cli("export", str(run), "--out", str(pipe)) is None
        assert "is inside an exported pipeline" in (cli("export", str(run), "--out", str(pipe / "sub")) or "")
        assert cli("export", str(run), "--out", str(pipe), "--overwrite") is None


def test_a_prompts_jsonl_no_sample_run_wrote_is_never_overwritten(run2, tmp_path):
    """The generic layout writes OUT/prompts.jsonl: the user's own prompt file there (``--prompts prompts.jsonl
    -o .``) or any prompts.jsonl in a folder without a sample_run.json is refused, not replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    own = out / "prompts.jsonl"
    own.write_text('{"prompt": "a red square on the left"}\n')
    before = _snapshot(out)
    with pytest.raises(SemrouteError, match=rf"--prompts {own} is the file this run writes its prompt index to"):
        sample(_base(run2, out, prompts=None, prompts_file=str(own)))
    with pytest.raises(SemrouteError, match=rf"-o {out} holds a prompts.jsonl that no sample run wrote"):
        sample(_base(run2, out))
    assert _snapshot(out) == before
    # a sample run's own index is rewritten by its rerun, as before
    again = tmp_path / "again"
    sample(_base(run2, again))
    assert sample(_base(run2, again))["images_written"] == 0 and (again / "prompts.jsonl").exists()
