"""Fault injection: every file of a finished text cache, latent cache and run folder, damaged three ways.

The cases are generated, not listed: for each file under the store or run (whatever the writers produced)
and each fault (one bit flipped in the middle, cut to half its size, deleted), a fresh copy is damaged
and then

- for caches: ``verify`` runs, and the consumer training uses (the joined dataset: every caption, the
  null caption, every latent, lengths and buckets, as a training step reads them) and ``info`` run;
- for run folders: ``sample`` (one image) and ``--resume latest`` (one more step) and ``info`` run.

Each must end in a clean, named error (a ``SemrouteError``; for damaged cache data a ``CacheDamaged``
naming the store) or in the exact result of the undamaged input: never another exception (a traceback
for the user) and never different data used silently. Where the consumer fails or differs, ``verify``
must have reported a problem. Every case that fails is listed in the assertion message.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import run_cli, write_manifest, write_square_images

FAULTS = ("flip", "truncate", "delete")
TIMES: dict[str, tuple[int, float]] = {}  # suite part -> (cases, seconds), printed by the last test


def damage(path: Path, fault: str) -> None:
    data = path.read_bytes()
    if fault == "delete":
        path.unlink()
    elif fault == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif data:
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x04
        path.write_bytes(bytes(flipped))


def files_of(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- caches ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_dir):
    """A finished text cache (3 feature shards, fp8 to include scales) and latent cache (2 shards) of 24
    captioned images, with ids."""
    root = tmp_path_factory.mktemp("faults")
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(write_square_images(root / "img", 24))]
    manifest = write_manifest(root / "m.jsonl", records)
    text, latents = root / "t.zarr", root / "l.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(text), llm=str(tiny_llama_dir), dtype="float32",
                                 storage="fp8", device="cpu", shard_mb=0.01, progress=False))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(latents), vae="pixel", resolution=32, workers=0,
                                     device="cpu", shard_mb=0.05, progress=False))
    return text, latents


def consume(text: Path, latents: Path) -> list:
    """Everything training reads from the two caches, in a fixed order."""
    from semroute.stage2_train.data import PairedCaches

    ds = PairedCaches(str(text), str(latents), text_layers=None, seed=0, caption_dropout=0.0)
    out: list = [ds.null, ds.bucket_ids().tolist(), ds.text_lengths().tolist()]
    for sample in range(len(ds)):
        item = ds.item(sample, 0)
        out += [item["sample_id"], item["caption"], item["text"], item["latent"]]
    for c in ds.caption_idx.tolist():
        out.append(ds.text.caption(int(c)))
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _outcome(fn):
    """('ok', value) | ('named', message) for a SemrouteError | ('traceback', repr) for anything else."""
    try:
        return "ok", fn()
    except SemrouteError as err:
        return "named", str(err)
    except Exception as err:  # noqa: BLE001 - exactly what this suite looks for
        return "traceback", f"{type(err).__name__}: {err}"


@pytest.mark.parametrize("kind", ["text", "latent"])
def test_every_damaged_cache_file_is_named_or_harmless(caches, tmp_path, kind):
    from semroute.shared.inspect import describe, verify

    text, latents = caches
    reference = consume(text, latents)
    assert verify(str(text))[1] == [] and verify(str(latents))[1] == []
    target = text if kind == "text" else latents
    failures, cases, t0 = [], 0, time.perf_counter()
    for rel in files_of(target):
        for fault in FAULTS:
            cases += 1
            copy = tmp_path / f"{kind}-{cases}" / target.name
            shutil.copytree(target, copy)
            damage(copy / rel, fault)
            pair = (copy, latents) if kind == "text" else (text, copy)
            where = f"{rel} {fault}"
            v = _outcome(lambda: verify(str(copy)))
            used = _outcome(lambda: consume(*pair))
            info = _outcome(lambda: describe(str(copy)))
            if "traceback" in (v[0], used[0], info[0]):
                failures.append(f"{where}: traceback: verify {v[1] if v[0] == 'traceback' else ''} "
                                f"consumer {used[1] if used[0] == 'traceback' else ''} "
                                f"info {info[1] if info[0] == 'traceback' else ''}")
                continue
            problems = v[1][1] if v[0] == "ok" else ["verify raised: " + v[1]]
            if used[0] == "ok" and not same(used[1], reference):
                failures.append(f"{where}: training data silently differs (verify: {problems[:1]})")
            elif used[0] == "named" and not problems:
                failures.append(f"{where}: the consumer failed ({used[1][:120]}) but verify found nothing")
            elif used[0] == "named" and str(copy) not in used[1]:
                failures.append(f"{where}: the error does not name the store: {used[1][:160]}")
            shutil.rmtree(copy.parent)
    TIMES[f"{kind} cache"] = (cases, time.perf_counter() - t0)
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures)


def test_train_on_a_damaged_cache_exits_with_one_named_error(caches, tmp_path):
    """Through the CLI, with the loader in threads (default) and in a DataLoader worker process."""
    text, latents = caches
    copy = tmp_path / "t.zarr"
    shutil.copytree(text, copy)
    shard = sorted((copy / "features" / "c").rglob("*"))[-1]
    damage(shard, "flip")
    for loader in ("thread", "process"):
        proc = run_cli("train", "--text-cache", str(copy), "--latent-cache", str(latents), "--fusion", "static",
                       "--preset", "tiny", "--batch-size", "4", "--max-steps", "30", "--no-progress", "--out",
                       str(tmp_path / f"run-{loader}"), "--set", "tensorboard=false", "--set", f"loader={loader}",
                       "--num-workers", "1", check=False, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr[-2000:]
        assert f"error: {shard}" in proc.stderr and f"semroute verify {copy}" in proc.stderr, proc.stderr[-2000:]


# -- run folders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(caches, tmp_path_factory):
    """A run trained 2 steps (one checkpoint), and the reference: step 3's loss of an uninterrupted run and
    the image ``sample`` draws from the checkpoint."""
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.train import train

    text, latents = caches
    root = tmp_path_factory.mktemp("runs")
    common = dict(text_cache=str(text), latent_cache=str(latents), preset="tiny", fusion="static", batch_size=4,
                  num_workers=0, tensorboard=False, log_every=1, checkpoint_every=2, lr=1e-3)
    train(TrainConfig(out=str(root / "run"), max_steps=2, **common), progress=False)
    train(TrainConfig(out=str(root / "ref"), max_steps=3, **common), progress=False)
    ref_loss = _losses(root / "ref")[3]
    image = _sample(root / "run", root / "ref-sample")
    return root / "run", ref_loss, image


def _losses(run: Path) -> dict[int, float]:
    from semroute.stage2_train.run_folder import RunFolder

    return {r["step"]: r["loss"] for r in RunFolder(run).metrics() if "loss" in r}


def _sample(run: Path, out: Path):
    import numpy as np
    from PIL import Image

    from semroute.stage2_train.sampling import SampleConfig, sample

    sample(SampleConfig(checkpoint=str(run), out=str(out), prompts=["a red square on the left"], steps=2,
                        guidance=2.0, device="cpu", progress=False, grid=False))
    return np.asarray(Image.open(next(out.glob("*.png"))))


def _resume(run: Path) -> float:
    """What `train --out RUN --resume latest --max-steps 3` does, in-process."""
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.run_folder import RunFolder
    from semroute.stage2_train.train import train

    folder = RunFolder(run)
    cfg = TrainConfig.build(config_file=str(folder.config_file(folder.resolve_resume("latest"))),
                            flags={"max_steps": 3, "out": str(run)})
    train(cfg, resume="latest", progress=False)
    return _losses(run)[3]


def test_every_damaged_run_file_is_named_or_harmless(finished_run, tmp_path):
    import numpy as np

    from semroute.stage2_train.run_info import describe_run

    run, ref_loss, ref_image = finished_run
    failures, cases, t0 = [], 0, time.perf_counter()
    for rel in files_of(run):
        for fault in FAULTS:
            cases += 1
            copy = tmp_path / f"case-{cases}" / "run"
            shutil.copytree(run, copy)
            damage(copy / rel, fault)
            where = f"{rel} {fault}"
            image = _outcome(lambda: _sample(copy, copy.parent / "samples"))
            info = _outcome(lambda: describe_run(str(copy)))
            loss = _outcome(lambda: _resume(copy))
            for name, got in (("sample", image), ("info", info), ("resume", loss)):
                if got[0] == "traceback":
                    failures.append(f"{where}: {name}: traceback: {got[1][:200]}")
            if image[0] == "ok" and not np.array_equal(image[1], ref_image):
                failures.append(f"{where}: sample silently drew another image")
            if loss[0] == "ok" and loss[1] != ref_loss:
                failures.append(f"{where}: resume silently trained differently ({loss[1]} vs {ref_loss})")
            shutil.rmtree(copy.parent)
    TIMES["run folder"] = (cases, time.perf_counter() - t0)
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures)


def test_zz_report_suite_size():
    """Prints the cases tried and the time of each part (recorded in bench/RESULTS.md)."""
    for part, (cases, seconds) in TIMES.items():
        print(f"fault suite: {part}: {cases} cases in {seconds:.1f}s")


def test_caches_finished_before_seals_still_open(caches, tmp_path):
    """A cache without the integrity record (written by an older semroute) opens and verifies as before."""
    from semroute.shared.inspect import verify
    from semroute.shared.store import ATTR_KEY, open_group

    text, latents = caches
    reference = consume(text, latents)
    old = tmp_path / "t.zarr"
    shutil.copytree(text, old)
    group = open_group(str(old), mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    attrs.pop("integrity")
    group.attrs.update({ATTR_KEY: attrs})
    assert same(consume(old, latents), reference)
    checked, problems, notes = verify(str(old))
    assert problems == [] and checked > 10 and "no integrity record" in notes[0]
