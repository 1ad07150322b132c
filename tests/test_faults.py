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

from semroute.shared.errors import SemrouteError
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import run_cli, write_manifest, write_square_images

FAULTS = ("flip", "truncate", "delete")
TIMES: dict[str, tuple[int, float]] = {}  # suite part -> (cases, seconds), printed by the last test


def damaged(data: bytes, fault: str) -> bytes | None:
    """``data`` after ``fault``: None for deleted, half for truncated, one bit flipped in the middle."""
    if fault == "delete":
        return None
    if fault == "truncate":
        return data[: len(data) // 2]
    flipped = bytearray(data)
    if flipped:
        flipped[len(data) // 2] ^= 0x04
    return bytes(flipped)


def damage(path: Path, fault: str) -> None:
    data = damaged(path.read_bytes(), fault)
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)


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


def judge(where: str, store: str, reference: list, *, verify, consumer, **others) -> str | None:
    """What is wrong with one damaged case (None: nothing), from the outcomes of ``verify``, the training
    consumer and any ``others`` (e.g. info): a traceback; data that silently differs from ``reference``; a
    consumer failing where verify found nothing; an error or a report that does not name ``store``."""
    outcomes = {"verify": verify, "consumer": consumer, **others}
    tracebacks = [f"{name} {got[1][:200]}" for name, got in outcomes.items() if got[0] == "traceback"]
    if tracebacks:
        return f"{where}: traceback: " + "; ".join(tracebacks)
    problems = verify[1][1] if verify[0] == "ok" else ["verify raised: " + verify[1]]
    if consumer[0] == "ok":
        same_data = same(consumer[1], reference)
        return None if same_data else f"{where}: training data silently differs (verify: {problems[:1]})"
    if not problems:
        return f"{where}: the consumer failed ({consumer[1][:120]}) but verify found nothing"
    if store not in consumer[1]:
        return f"{where}: the error does not name the store: {consumer[1][:160]}"
    if not any(store in p for p in problems):
        return f"{where}: verify's report does not name the store: {problems[:1]}"
    return None


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
            failure = judge(where, str(copy), reference, verify=_outcome(lambda: verify(str(copy))),
                            consumer=_outcome(lambda: consume(*pair)), info=_outcome(lambda: describe(str(copy))))
            if failure:
                failures.append(failure)
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


# -- caches on object storage --------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_caches(caches):
    """The same two caches uploaded to a bucket of a loopback S3 server: ``(server, text_url, latent_url)``."""
    from s3_testutil import LoopbackS3

    from semroute.shared import remote

    text, latents = caches
    with LoopbackS3() as server:
        server.make_bucket("faults")
        fs, _ = remote.filesystem("s3://faults/x")
        for local in (text, latents):
            for rel in files_of(local):
                fs.pipe_file(f"faults/{local.name}/{rel}", (local / rel).read_bytes())
        yield server, f"s3://faults/{text.name}", f"s3://faults/{latents.name}"


def one_file_per_array(root: Path) -> list[str]:
    """A representative file of each part of a store: per array its last chunk or shard, the index and the
    root's zarr.json (holding the attributes and the integrity record)."""
    picked: dict[str, str] = {}
    for rel in files_of(root):
        if "/c/" in rel:
            picked[rel.split("/c/")[0]] = rel
    return sorted(picked.values()) + ["index.parquet", "zarr.json"]


@pytest.mark.slow
def test_damaged_caches_on_s3_are_named_with_their_url(caches, s3_caches):
    """The local suite's faults on the remote copies (one file of each array, the index and the attributes,
    each damaged one of the three ways in turn): verify and the training reader name the URL, or read
    exactly the undamaged data."""
    from semroute.shared import remote
    from semroute.shared.inspect import verify

    text, latents = caches
    _, url_t, url_l = s3_caches
    reference = consume(text, latents)
    assert same(consume(url_t, url_l), reference)
    fs, _ = remote.filesystem(url_t)
    failures, cases, t0 = [], 0, time.perf_counter()
    for local, url in ((text, url_t), (latents, url_l)):
        for i, rel in enumerate(one_file_per_array(local)):
            key = f"{url.removeprefix('s3://')}/{rel}"
            original = fs.cat_file(key)
            for fault in (FAULTS[i % len(FAULTS)],):  # each file one fault, the faults in turn (keeps it short)
                cases += 1
                data = damaged(original, fault)
                fs.rm(key) if data is None else fs.pipe_file(key, data)
                pair = (url, url_l) if url == url_t else (url_t, url)
                where = f"{url}/{rel} {fault}"
                failure = judge(where, url, reference, verify=_outcome(lambda: verify(url)),
                                consumer=_outcome(lambda: consume(*pair)))
                fs.pipe_file(key, original)
                if failure:
                    failures.append(failure)
    TIMES["s3 caches"] = (cases, time.perf_counter() - t0)
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures)


def test_train_from_s3_names_a_missing_bucket_a_dead_endpoint_and_a_shard_deleted_mid_run(s3_caches, tmp_path,
                                                                                          monkeypatch):
    """What tests/test_remote.py checks on a text cache reader, here through training (its latent cache
    and the trainer): each fault is one error naming the URL and what to do, and no checkpoint is written."""
    from semroute.shared import remote
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.data import PairedCaches
    from semroute.stage2_train.train import train

    _, url_t, url_l = s3_caches
    common = dict(fusion="static", preset="tiny", batch_size=4, num_workers=0, tensorboard=False, max_steps=1)
    with pytest.raises(SemrouteError, match=r"s3://gone/l\.zarr.*bucket 'gone' does not exist"):
        train(TrainConfig(text_cache=url_t, latent_cache="s3://gone/l.zarr", out=str(tmp_path / "a"), **common),
              progress=False)
    monkeypatch.setattr(remote, "MAX_TRIES", 2)
    try:
        with pytest.raises(SemrouteError, match=r"cannot reach the object store for s3://faults/.*endpoint"):
            train(TrainConfig(text_cache=url_t, latent_cache=url_l, out=str(tmp_path / "b"),
                              storage_options={"endpoint_url": "http://127.0.0.1:9"}, **common), progress=False)
    finally:
        remote.set_storage_options(None)
    for run in ("a", "b"):
        assert not (tmp_path / run / "checkpoints").exists() or not any((tmp_path / run / "checkpoints").iterdir())

    # A latent shard deleted while a job reads the cache: the next read of it names the object.
    ds = PairedCaches(url_t, url_l, text_layers=None, seed=0, caption_dropout=0.0)
    last = len(ds) - 1
    ds.item(last, 0)
    fs, _ = remote.filesystem(url_l)
    shards = sorted(fs.find(f"{url_l.removeprefix('s3://')}/buckets"))
    shard = [k for k in shards if "/latent/c/" in k][-1]
    original = fs.cat_file(shard)
    fs.rm(shard)
    try:
        with pytest.raises(SemrouteError, match=r"s3://faults/l\.zarr/buckets/.*/latent/c/.*(deleted|missing).*verify"):
            ds.item(last, 0)
    finally:
        fs.pipe_file(shard, original)


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
                            max_steps=3, out=str(run))
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
