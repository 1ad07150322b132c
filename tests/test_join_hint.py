"""The text and latent caches join by exact sample id; ids that would join only after ``str.strip()`` /
``casefold()`` (a CSV id " 001" and a tar key "001"; "IMG_1" and "img_1") are named with an example and a
count, in the error when nothing joins and in ``PairedCaches.join_warning`` when only some do, never joined."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.shared.errors import SemrouteError
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.data import PairedCaches
from testkit import write_manifest, write_square_images

IDS = [f"img_{i}" for i in range(6)]


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> tuple[Path, list[dict], str]:
    """Six square images with ids ``img_0`` ... and their latent cache: ``(root, records, latent_cache)``."""
    root = tmp_path_factory.mktemp("join_hint")
    records = write_square_images(root / "img", len(IDS))
    latents = root / "l.zarr"
    encode_images(EncodeImagesConfig(data=str(write_manifest(root / "images.jsonl", [
        {**r, "id": sid} for r, sid in zip(records, IDS)])), out=str(latents), vae="pixel", resolution=32,
        device="cpu", workers=0, progress=False))
    return root, records, str(latents)


def _join(squares, tiny_llama_dir, name: str, ids: list[str]) -> PairedCaches:
    root, records, latents = squares
    manifest = write_manifest(root / f"{name}.jsonl", [{"id": sid, "text": r["text"]} for r, sid in zip(records, ids)])
    encode_text(EncodeTextConfig(data=str(manifest), out=str(root / f"{name}.zarr"), llm=str(tiny_llama_dir),
                                 dtype="float32", device="cpu", progress=False))
    return PairedCaches(str(root / f"{name}.zarr"), latents, text_layers=None)


@pytest.mark.parametrize("name, ids, kinds", [
    ("spaced", [f" {sid}" for sid in IDS], "whitespace"),  # a CSV id column written as "id, text"
    ("upper", [sid.upper() for sid in IDS], "case"),
    ("both", [f"{sid.upper()} " for sid in IDS], "whitespace/case")])
def test_ids_that_differ_only_by_whitespace_or_case_are_named_when_nothing_joins(squares, tiny_llama_dir, name, ids,
                                                                                 kinds):
    with pytest.raises(SemrouteError) as err:
        _join(squares, tiny_llama_dir, name, ids)
    message = str(err.value)
    assert f"no sample id is in both {squares[0] / f'{name}.zarr'} (6 ids)" in message
    assert f"e.g. {ids[0]!r} in the text cache, 'img_0' in the latent cache" in message
    assert (f"ids differ only by surrounding {kinds}: 6 of the 6 encoded images without a caption would join one "
            f"after str.strip()/casefold() (e.g. text cache {ids[0]!r}, latent cache 'img_0')") in message
    assert "re-encode one side with ids that match" in message


def test_unrelated_ids_get_examples_and_no_hint(squares, tiny_llama_dir):
    with pytest.raises(SemrouteError, match=r"\(6 encoded images; e\.g\. 'other_0' in the text cache, 'img_0' in the "
                                            r"latent cache\): were they encoded from the same manifest\?$"):
        _join(squares, tiny_llama_dir, "other", [f"other_{i}" for i in range(6)])


def test_some_ids_join_and_the_near_misses_are_warned_about_not_joined(squares, tiny_llama_dir):
    ids = ["img_0", "img_1", "img_2", "IMG_3", " img_4", "zz"]
    ds = _join(squares, tiny_llama_dir, "partial", ids)
    assert len(ds) == 3 and ds.n_text_only == 3 and ds.n_image_only == 3
    assert sorted(ds.latents.sample_ids[p] for p in ds.latent_pos) == IDS[:3]  # ids stay exact
    assert ds.join_warning == (
        "ids differ only by surrounding whitespace/case: 2 of the 3 encoded images without a caption would join one "
        "after str.strip()/casefold() (e.g. text cache 'IMG_3', latent cache 'img_3'); ids are joined exactly, so "
        "re-encode one side with ids that match the other's")
    exact = _join(squares, tiny_llama_dir, "exact", IDS[:4] + ["x", "y"])
    assert len(exact) == 4 and exact.n_image_only == 2 and exact.join_warning is None


def test_train_prints_the_near_miss_warning(squares, tiny_llama_dir, tmp_path, capsys):
    from semroute.stage2_train.train import Trainer
    from testkit import train_config

    text = _join(squares, tiny_llama_dir, "partial_train", ["img_0", "img_1", "img_2", "IMG_3", "a", "b"]).text.location
    trainer = Trainer(train_config((text, squares[2]), tmp_path / "run", batch_size=2), progress=False)
    trainer.release()
    assert ("warning: ids differ only by surrounding case: 1 of the 3 encoded images without a caption would join"
            in capsys.readouterr().err)
