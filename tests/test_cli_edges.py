"""Edge values at the command line: an image size the DiT cannot draw or memory cannot hold, an empty prompt or
output folder, a mistyped fusion, the defaults ``--help`` shows, and ``info`` on a cache without its index."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from semroute.cli import app
from semroute.shared.errors import SemrouteError
from semroute.stage2_train.sampling import RECORD, SampleConfig, load_pipeline, sample


def _cfg(run: Path, out: Path, **kw) -> SampleConfig:
    return SampleConfig(**{**dict(checkpoint=str(run), out=str(out), prompts=["a red square on the left"], steps=1,
                                  progress=False, device="cpu", grid=False), **kw})


def _refused(*args: str) -> str:
    """The message of a command that must be refused with a SemrouteError."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0 and isinstance(result.exception, SemrouteError), repr(result.exception)
    return str(result.exception)


# -- sample: sizes --------------------------------------------------------------------------------------------
def test_a_size_the_dit_cannot_patchify_is_refused_before_the_folder_is_claimed(run4, tmp_path):
    """34 px is a multiple of the pixel codec's 2, but its 17x17 latent is no multiple of the patch 2: that was
    found in the first forward pass, after sample_run.json claimed the folder."""
    out = tmp_path / "s"
    with pytest.raises(SemrouteError, match=r"--resolution 34: a side must be a multiple of 4 \(the autoencoder's "
                                            r"factor 2 x the DiT's patch size 2\), e.g. 32 or 36"):
        sample(_cfg(run4, out, resolution=34))
    assert not out.exists()


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 111.76 GiB. GPU 0 has a total capacity of 79 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["accelerator", "cpu"])
def test_running_out_of_memory_names_the_size_and_batch(run4, tmp_path, monkeypatch, error):
    """``--resolution 100000`` ended in the allocator's traceback; the folder it had claimed then refused the
    smaller size the user tried next."""
    pipe = load_pipeline(run4, device="cpu")
    out = tmp_path / "s"

    def no_memory(*args, **kwargs):  # where the pipeline allocates the initial noise
        raise error

    monkeypatch.setattr(torch, "randn", no_memory)
    with pytest.raises(SemrouteError, match=r"out of memory drawing 2 image\(s\) of 32x32 px at once \(--batch-size 2, "
                                            r"--resolution 32\): .*allocate.*; try a smaller --resolution or "
                                            r"--batch-size$"):
        sample(_cfg(run4, out, prompts=["a red square", "a blue square"], resolution=32, batch_size=2), pipe=pipe)
    monkeypatch.undo()
    assert (out / RECORD).exists() and not list(out.rglob("*.png"))
    # the smaller size it suggests: the folder holds no images, so its record does not refuse other settings
    assert sample(_cfg(run4, out, prompts=["a red square", "a blue square"], resolution=16), pipe=pipe)[
        "images_written"] == 2


def test_running_out_of_memory_after_some_images_says_where_they_are(run4, tmp_path, monkeypatch):
    pipe = load_pipeline(run4, device="cpu")
    out = tmp_path / "s"
    randn, calls = torch.randn, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", second_fails)
    with pytest.raises(SemrouteError, match=rf"; try a smaller --resolution into another -o \(the 1 image\(s\) "
                                            rf"written are kept in {out}\)$"):
        sample(_cfg(run4, out, prompts=["a red square", "a blue square"], resolution=32, batch_size=1), pipe=pipe)
    assert len(list(out.rglob("*.png"))) == 1

def test_other_runtime_errors_are_not_taken_for_memory(run4, tmp_path, monkeypatch):
    pipe = load_pipeline(run4, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("expected scalar type Float but found Half")

    monkeypatch.setattr(torch, "randn", broken)
    with pytest.raises(RuntimeError, match="expected scalar type") as caught:
        sample(_cfg(run4, tmp_path / "s"), pipe=pipe)
    assert not isinstance(caught.value, SemrouteError)


def test_a_folder_with_images_of_other_settings_is_still_refused(run4, tmp_path):
    out = tmp_path / "s"
    assert sample(_cfg(run4, out))["images_written"] == 1
    with pytest.raises(SemrouteError, match=r"holds images made with other settings \(resolution None -> 16\)"):
        sample(_cfg(run4, out, resolution=16))


# -- empty prompts and folders --------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, which", [([""], 1), (["a red square", "  "], 2)])
def test_an_empty_prompt_is_refused(run4, tmp_path, prompts, which):
    out = tmp_path / "s"
    with pytest.raises(SemrouteError, match=rf"--prompt {which} is empty; .*--guidance 0"):
        sample(_cfg(run4, out, prompts=prompts))
    assert not out.exists()
    said = _refused("sample", "-c", str(run4), "-p", "", "-o", str(out), "--device", "cpu", "--no-progress")
    assert "--prompt 1 is empty" in said and not out.exists()


def test_an_empty_output_folder_is_refused(run4, tmp_path, monkeypatch):
    """``Path('')`` is the current folder: ``-o ''`` and ``demo --out ''`` wrote into it."""
    monkeypatch.chdir(tmp_path)
    said = _refused("sample", "-c", str(run4), "-p", "a red square", "-o", "", "--steps", "1", "--device", "cpu",
                    "--no-progress")
    assert said.startswith("-o is empty")
    # (--steps 0, refused too, keeps a demo that took '' for '.' from running)
    assert _refused("demo", "--out", "", "--steps", "0", "--no-progress").startswith("--out is empty")
    assert list(tmp_path.iterdir()) == []


# -- train ------------------------------------------------------------------------------------------------------
def test_an_unknown_fusion_is_named_by_its_flag_with_the_choices(square_caches, tmp_path):
    from semroute.stage2_train.models import MODELS

    text, latents, _ = square_caches
    said = _refused("train", "--text-cache", text, "--latent-cache", latents, "--out", str(tmp_path / "run"),
                    "--fusion", "bogus", "--no-progress")
    assert said == f"--fusion 'bogus' is unknown; choose one of {', '.join(MODELS)}"
    assert not (tmp_path / "run").exists()



def test_an_empty_config_is_refused_by_train(square_caches, tmp_path):
    """cli.py read ``--config ''`` as no --config: the run trained with the defaults."""
    text, latents, _ = square_caches
    said = _refused("train", "--text-cache", text, "--latent-cache", latents, "--out", str(tmp_path / "run"),
                    "--config", "", "--preset", "tiny", "--max-steps", "1", "--no-progress")
    assert said.startswith("--config is empty; give a YAML file or a config name")
    assert not (tmp_path / "run").exists()

def test_train_help_shows_a_default_of_zero():
    """``--holdout``'s default 0 was hidden with the empty ones (``0 in (None, "", False)`` is true)."""
    import typer

    train = typer.main.get_command(app).commands["train"]
    helps = {param.opts[0]: param.help for param in train.params}
    assert helps["--holdout"].endswith("(default: 0)")
    assert "(default" not in helps["--text-cache"] and "(default" not in helps["--compile"]


# -- info ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1], ids=["text", "latent"])
def test_info_says_the_index_is_missing(square_caches, tmp_path, which):
    from semroute.shared.inspect import describe

    cache = tmp_path / Path(square_caches[which]).name
    shutil.copytree(square_caches[which], cache)
    assert describe(str(cache))["complete"] is True
    (cache / "index.parquet").unlink()
    info = describe(str(cache))
    assert info["complete"] is False
    assert info["index"].startswith("index.parquet is missing, so the cache cannot be read; re-encode it")
    result = CliRunner().invoke(app, ["info", str(cache)])
    assert result.exit_code == 0 and "index.parquet is missing" in result.output


def test_info_on_a_create_cut_before_its_index_says_resume(square_caches, tmp_path, monkeypatch, tiny_llama_dir):
    from semroute.shared import text_store
    from semroute.shared.inspect import describe
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(text_store, "write_parquet", killed)
    cache = tmp_path / "t.zarr"
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(EncodeTextConfig(data=str(square_caches[2]), out=str(cache), llm=str(tiny_llama_dir),
                                     dtype="float32", device="cpu", progress=False))
    monkeypatch.undo()
    info = describe(str(cache))
    assert info["complete"] is False and info["index"].endswith("cut short; run it again with --resume")


# -- outputs that are local folders only ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["s3://bkt/out", "s3:/bkt/out"])
def test_a_url_for_a_local_output_is_refused(square_caches, run4, tmp_path, monkeypatch, url):
    """Only the caches may be on object storage: a URL for a run, an export, samples, a routing plot or a report
    was taken as a local path (s3://bkt/out as the folder s3:/bkt/out) without a word."""
    text, latents, _ = square_caches
    monkeypatch.chdir(tmp_path)
    said = {
        "train": _refused("train", "--text-cache", text, "--latent-cache", latents, "--out", url, "--preset", "tiny",
                          "--max-steps", "1", "--no-progress"),
        "export": _refused("export", str(run4), "--out", url),
        "sample": _refused("sample", "-c", str(run4), "-p", "a red square", "-o", url, "--steps", "1", "--device",
                           "cpu", "--no-progress"),
        "routing": _refused("routing", str(run4), "--out", url),
        "report": _refused("report", str(run4), "--out", url + ".html"),
    }
    for command, message in said.items():
        if url.startswith("s3://"):
            assert "is a URL" in message or "not to a URL" in message, (command, message)
        else:
            assert "not a URL (s3: needs two slashes)" in message, (command, message)
    assert list(tmp_path.iterdir()) == []
