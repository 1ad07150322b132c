"""encode-text: stored features are the model's, whatever the batching, sharding, resuming or process split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.shared.inspect import describe, verify
from semroute.shared.llm import load_llm
from semroute.shared.store import read_parquet
from semroute.shared.text_store import TextCacheReader
from semroute.shared.text_encoder import PromptFormat, TextEncoder
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import CLI, random_captions, run_cli, teardown_marks, write_manifest


def _encode(tmp_path, llm_dir, records, name="c.text.zarr", **kw):
    manifest = write_manifest(tmp_path / f"{name}.jsonl", records)
    cfg = EncodeTextConfig(data=str(manifest), out=str(tmp_path / name), llm=str(llm_dir), progress=False,
                           device="cpu", **kw)
    return cfg, encode_text(cfg)


def _alone(encoder: TextEncoder, text: str) -> torch.Tensor:
    """The reference: one caption run on its own, unpadded."""
    ids = encoder.tokenize([text])[0].ids
    feats, mask = encoder.forward([ids])
    assert mask.all()
    return feats[0]


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_stored_features_equal_forward_alone_fp32(tmp_path, request, arch):
    llm_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    records = random_captions(60, seed=1)
    # small shards and batches: many shard boundaries, many batch compositions
    cfg, summary = _encode(tmp_path, llm_dir, records, dtype="float32", layers="all", shard_mb=0.05, batch_tokens=256)
    reader = TextCacheReader(cfg.out)
    llm = load_llm(str(llm_dir), device="cpu", dtype="float32")
    encoder = TextEncoder(llm, PromptFormat(), reader.layers)
    texts = reader.index.column("text").to_pylist()
    assert len(texts) == summary["captions"] == sum(1 if isinstance(r["text"], str) else len(r["text"]) for r in records)
    assert reader.attrs["layout"]["rows_per_shard"] < summary["tokens"] / 4, "the test must cross shard boundaries"
    for i, text in enumerate(texts):
        stored = reader.caption(i)
        assert stored.dtype == torch.float32
        torch.testing.assert_close(stored, _alone(encoder, text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reader.null(), _alone(encoder, ""), rtol=1e-5, atol=1e-5)


def test_bf16_exact_bits_and_batch_invariance(tmp_path, tiny_llama_dir):
    """bf16 storage keeps the model's bits: stored == what a forward produced, and the same caption in
    two different datasets (other batch-mates, other lengths) stores the same values to bf16 precision."""
    records = random_captions(40, seed=2)
    target = {"image": "t.png", "text": " two red circle left of a blue square"}
    cfg_a, _ = _encode(tmp_path, tiny_llama_dir, records[:5] + [target], name="a.text.zarr")
    cfg_b, _ = _encode(tmp_path, tiny_llama_dir, [target] + records[5:], name="b.text.zarr", batch_tokens=4096)
    ra, rb = TextCacheReader(cfg_a.out), TextCacheReader(cfg_b.out)
    ia = ra.index.column("text").to_pylist().index(target["text"])
    ib = rb.index.column("text").to_pylist().index(target["text"])
    a, b = ra.caption(ia), rb.caption(ib)
    assert a.dtype == torch.bfloat16
    llm = load_llm(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    alone = _alone(TextEncoder(llm, PromptFormat(), ra.layers), target["text"])
    # bf16 rounding of differently shaped matmuls: within a few bf16 ulps of the values' scale
    torch.testing.assert_close(a.float(), alone.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    # stored bits round-trip exactly through the uint16 representation
    raw = zarr.open_group(cfg_a.out)["features"][int(ra.offsets[ia]): int(ra.offsets[ia + 1])]
    assert np.array_equal(raw, a.view(torch.uint16).numpy())


def test_fp8_storage_error_is_measured_and_shown(tmp_path, tiny_llama_dir):
    records = random_captions(30, seed=3)
    # small chunks: zarr stores the array's last chunk whole, which would dominate a store this small
    cfg_e, _ = _encode(tmp_path, tiny_llama_dir, records, name="e.text.zarr", dtype="float32", chunk_kb=4)
    cfg_q, _ = _encode(tmp_path, tiny_llama_dir, records, name="q.text.zarr", dtype="float32", storage="fp8",
                       chunk_kb=4)
    exact, fp8 = TextCacheReader(cfg_e.out), TextCacheReader(cfg_q.out)
    sq_err = sq = 0.0
    for i in range(len(exact)):
        x, q = exact.caption(i), fp8.caption(i)
        # e4m3 keeps 3 mantissa bits: per value error <= 2^-4 of the token-layer absmax
        bound = x.abs().amax(-1, keepdim=True) / 16 + 1e-12
        assert ((q - x).abs() <= bound).all()
        sq_err += float(((q - x) ** 2).sum())
        sq += float((x ** 2).sum())
    info = describe(cfg_q.out)
    shown = float(info["storage error vs exact"]["relative RMS"])
    assert shown == pytest.approx((sq_err / sq) ** 0.5, rel=1e-3)
    assert 0 < shown < 0.05
    # about one byte per value plus a 4-byte scale per token and layer (D = 32 here)
    assert info["bytes per token-layer value"] < 1 + 4 / 32 + 0.1
    assert describe(cfg_e.out)["bytes per token-layer value"] > 3.9  # float32 exact


def test_estimate_is_exact_and_writes_nothing(tmp_path, tiny_llama_dir):
    records = random_captions(50, seed=4)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = tmp_path / "c.text.zarr"
    common = dict(data=str(manifest), out=str(out), llm=str(tiny_llama_dir), progress=False, shard_mb=0.02)
    est = encode_text(EncodeTextConfig(**common, estimate=True))["estimate"]
    assert not out.exists()
    encode_text(EncodeTextConfig(**common))
    on_disk = sum(p.stat().st_size for p in (out / "features" / "c").rglob("*") if p.is_file())
    assert est["array_bytes"]["features"] == on_disk
    assert est["tokens"] == TextCacheReader(out).attrs["total_tokens"]
    assert est["shards"] > 3


def test_index_reader_batch_truncation_and_null(tmp_path, tiny_llama_dir):
    records = [{"image": "a", "text": " red circle"}, {"image": "b", "text": [" big blue square left of a tree", " dog"]},
               {"image": "c", "text": " " + " ".join(["cat"] * 40), "id": "long"}]
    cfg, summary = _encode(tmp_path, tiny_llama_dir, records, max_length=30)
    reader = TextCacheReader(cfg.out, layers=[2, 4])
    index = reader.index.to_pydict()
    assert index["sample_id"] == ["0", "1", "1", "long"]
    assert index["truncated"] == [False, False, False, True]
    assert summary["truncated"] == reader.attrs["n_truncated"] == 1
    assert max(index["n_tokens"]) == 30 and index["n_tokens_full"][3] > 30
    assert index["n_tokens"][:3] == index["n_tokens_full"][:3]
    feats, mask = reader.batch([0, 3])
    assert feats.shape == (2, 30, 2, 32) and mask.sum(1).tolist() == [index["n_tokens"][0], 30]
    assert torch.equal(feats[0, : index["n_tokens"][0]], reader.caption(0))
    assert (feats[0, index["n_tokens"][0]:] == 0).all()
    # a layer subset reads only what was asked
    full = TextCacheReader(cfg.out)
    assert torch.equal(reader.caption(1), full.caption(1)[:, [1, 3]])
    with pytest.raises(SemrouteError, match=r"\[7\] were asked for"):
        TextCacheReader(cfg.out, layers=[1, 7])


def test_empty_instruction_still_gives_a_null_condition(tmp_path, tiny_llama_dir):
    cfg, _ = _encode(tmp_path, tiny_llama_dir, random_captions(3), instruction="")
    null = TextCacheReader(cfg.out).null()
    assert null.shape[0] == 1 and torch.isfinite(null.float()).all()


def test_chat_template(tmp_path, tiny_llama_dir):
    cfg, _ = _encode(tmp_path, tiny_llama_dir, random_captions(3), chat_template=True)
    attrs = TextCacheReader(cfg.out).attrs
    assert attrs["null_text"].startswith("<|user|>Describe this image.<|end|>")
    assert attrs["fingerprint"]["prompt_chat_template"] is True


def test_resume_refuses_other_layers_instruction_or_captions(tmp_path, tiny_llama_dir):
    records = random_captions(10)
    cfg, _ = _encode(tmp_path, tiny_llama_dir, records)
    base = dict(data=cfg.data, out=cfg.out, llm=cfg.llm, progress=False, resume=True)
    with pytest.raises(FingerprintMismatch, match=r"layers: cache has \[1, 2, 3, 4\], expected \[3, 4\]"):
        encode_text(EncodeTextConfig(**base, layers="last:2"))
    with pytest.raises(FingerprintMismatch, match="prompt_instruction: cache has 'Describe this image.'"):
        encode_text(EncodeTextConfig(**base, instruction="A photo of"))
    write_manifest(Path(cfg.data), records[:-1])
    with pytest.raises(SemrouteError, match="manifest changed"):
        encode_text(EncodeTextConfig(**base))
    with pytest.raises(SemrouteError, match="already exists. Pass --resume"):
        encode_text(EncodeTextConfig(**{**base, "resume": False}))
    # the refused runs left the finished cache as it was
    assert TextCacheReader(cfg.out).attrs["complete"]
    assert verify(cfg.out)[1] == []


def test_verify_names_the_shard_with_a_flipped_byte(tmp_path, tiny_llama_dir):
    cfg, _ = _encode(tmp_path, tiny_llama_dir, random_captions(40), shard_mb=0.02)
    checked, problems, _ = verify(cfg.out)
    assert problems == [] and checked > 3
    shard = Path(cfg.out) / "features" / "c" / "2" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    checked, problems, _ = verify(cfg.out)
    assert len(problems) == 1 and "features/c/2/0/0" in problems[0] and "crc32c" in problems[0]
    proc = run_cli("verify", cfg.out, check=False)
    assert proc.returncode == 1 and "features/c/2/0/0" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_bad_manifest_cli_error_names_line_and_writes_nothing(tmp_path, tiny_llama_dir):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": " red"}\n{"text": 3}\n')
    out = tmp_path / "c.text.zarr"
    proc = run_cli("encode-text", str(manifest), "--llm", str(tiny_llama_dir), "--out", str(out), check=False)
    assert proc.returncode == 1
    assert f"{manifest}:2: 'text' is int" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = run_cli("encode-text", str(manifest), "--llm", str(tiny_llama_dir), "--out", str(out), "--skip-bad",
                   "--no-progress")
    assert "skipped" in proc.stderr and TextCacheReader(out).n_captions == 1
    assert json.loads((out / "bad_records.jsonl").read_text())["line"] == 2


def _arrays(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path))
    return {name: np.asarray(group[name][:]) for name in ("features", "offsets", "null_features")}


def _assert_same_store(a, b):
    xa, xb = _arrays(a), _arrays(b)
    for name in xa:
        assert np.array_equal(xa[name], xb[name]), name
    ia, ib = read_parquet(a, "index.parquet"), read_parquet(b, "index.parquet")
    assert ia.equals(ib)


def test_resume_after_kill_9_gives_identical_store(tmp_path, tiny_llama_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(1500, seed=5))
    args = ["encode-text", str(manifest), "--llm", str(tiny_llama_dir), "--shard-mb", "0.01", "--batch-tokens", "64",
            "--no-progress"]
    ref = tmp_path / "ref.text.zarr"
    run_cli(*args, "--out", str(ref))

    out = tmp_path / "killed.text.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(CLI), *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = out / "progress" / "features" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if flags.exists() and len(list(flags.iterdir())) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader_attrs = zarr.open_group(str(out)).attrs["semroute"]
    assert not reader_attrs["complete"]
    with pytest.raises(SemrouteError, match="not complete"):
        TextCacheReader(out)

    done = run_cli(*args, "--out", str(out), "--resume")
    assert "resumed:" in done.stdout
    _assert_same_store(ref, out)
    assert verify(str(out))[1] == []


def test_two_processes_write_the_same_store_as_one(tmp_path, tiny_llama_dir):
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(300, seed=6))
    common = ["encode-text", str(manifest), "--llm", str(tiny_llama_dir), "--shard-mb", "0.02", "--no-progress"]
    one = tmp_path / "one.text.zarr"
    run_cli(*common, "--out", str(one))
    two = tmp_path / "two.text.zarr"
    hook_env, marks = teardown_marks(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **hook_env}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(CLI), *common,
         "--out", str(two)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    attrs = TextCacheReader(two).attrs
    assert attrs["world_size"] == 2  # two processes really ran
    assert "on 2 process(es)" in proc.stdout
    assert list(marks.iterdir()) == []  # ended without the teardown that can hang (shared/processes.py)
    assert TextCacheReader(one).attrs["world_size"] == 1
    _assert_same_store(one, two)


def test_real_smollm2_through_gguf(tmp_path, smollm2_llm):
    """The real SmolLM2-135M-Instruct GGUF: stored features equal a forward of each caption alone."""
    records = [{"text": " a red circle to the left of a blue square"}, {"text": " three yellow stars"},
               {"text": " a photo of a dog"}]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    cfg = EncodeTextConfig(data=str(manifest), out=str(tmp_path / "s.text.zarr"), llm="smollm2", progress=False,
                           dtype="float32", layers="every:6")
    encode_text(cfg, llm=smollm2_llm)
    reader = TextCacheReader(cfg.out)
    assert reader.layers == [6, 12, 18, 24, 30] and reader.hidden_size == 576
    fp = reader.fingerprint
    assert fp["llm_ref"] == "smollm2" and fp["llm_architecture"] == "LlamaModel" and len(fp["llm_weights_sha256"]) == 64
    encoder = TextEncoder(smollm2_llm, PromptFormat(), reader.layers)
    for i, rec in enumerate(records):
        torch.testing.assert_close(reader.caption(i), _alone(encoder, rec["text"]), rtol=1e-4, atol=1e-4)


def test_a_cache_recording_its_llm_by_relative_path_still_matches_the_same_folder(tmp_path, monkeypatch):
    """Caches written before local LLMs were recorded by absolute path hold the path as typed: a resume or
    append from the same place, or naming the same folder absolutely, is the same LLM; another folder is not."""
    from semroute.shared.errors import FingerprintMismatch
    from semroute.shared.fingerprint import require_match

    (tmp_path / "llm").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    old = {"llm_ref": "llm", "llm_weights_sha256": "abc"}
    require_match(old, {"llm_ref": str(tmp_path / "llm"), "llm_weights_sha256": "abc"}, None, "cache")
    with pytest.raises(FingerprintMismatch, match=r"llm_ref: cache has 'llm', expected '.*other'"):
        require_match(old, {"llm_ref": str(tmp_path / "other"), "llm_weights_sha256": "abc"}, None, "cache")
    with pytest.raises(FingerprintMismatch, match=r"llm_ref: cache has 'org/model', expected 'llm'"):
        require_match({"llm_ref": "org/model"}, {"llm_ref": "llm"}, None, "cache")  # a hub id is never a folder here


class _Loaded(Exception):
    """Raised by a stand-in model loader, carrying the device it was asked for."""


def test_auto_device_under_several_processes_is_each_process_s_own(tmp_path, monkeypatch):
    """Every spelling of auto (``auto``, ``""``, none) gives rank N accelerate's device N, never one shared by all
    ranks; an explicit device is kept."""
    from semroute.shared.distributed import ProcessInfo
    from semroute.shared.llm import resolve_device
    from semroute.stage1_encode import text as text_mod

    own = torch.device("meta")  # not a device resolve_device would pick
    proc = ProcessInfo(1, 2, own)
    assert [proc.device_for(d) for d in ("auto", "", None)] == [own] * 3
    assert proc.device_for("cpu") == torch.device("cpu")
    assert ProcessInfo(0, 1, own).device_for("") == resolve_device("auto")

    def load(ref, device, dtype):
        raise _Loaded(device)

    monkeypatch.setattr(text_mod, "load_llm", load)
    monkeypatch.setattr(proc, "broadcast", lambda obj: ("ok", True))  # rank 0's checks before the load passed
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(2))
    for auto in ("auto", ""):
        with pytest.raises(_Loaded) as got:
            text_mod.EncodeTextRun(EncodeTextConfig(data=str(manifest), out=str(tmp_path / "c.text.zarr"),
                                                    device=auto, progress=False), proc)
        assert str(got.value.args[0]) == str(own), auto


def test_shard_and_chunk_sizes_are_bytes_the_same_way_for_both_encoders(tmp_path, tiny_llama_dir):
    from semroute.shared.store import ShardLayout
    from semroute.stage1_encode.images import EncodeImagesConfig

    for config in (EncodeTextConfig, EncodeImagesConfig):
        cfg = config(data="d", out="o", shard_mb=0.5, chunk_kb=1.5)
        assert (cfg.shard_bytes, cfg.chunk_bytes) == (1 << 19, 1536)
    cfg, summary = _encode(tmp_path, tiny_llama_dir, random_captions(8), dtype="float32", shard_mb=0.01, chunk_kb=2)
    reader = TextCacheReader(cfg.out)
    row_bytes = len(reader.stored_layers) * reader.hidden_size * 4
    assert reader._arrays()["features"].rows_per_shard == ShardLayout.plan(
        int(reader.offsets[-1]), row_bytes, cfg.shard_bytes, cfg.chunk_bytes).rows_per_shard


@pytest.mark.parametrize("case", ["empty", "folder without config.json", "damaged gguf", "folder with a bad config"])
def test_an_llm_that_cannot_be_loaded_is_one_error_naming_it(tmp_path, monkeypatch, case):
    """Not the current folder taken as a model for ``--llm ''``, not transformers' own ValueError or struct.error."""
    from semroute.shared.errors import SemrouteError

    monkeypatch.chdir(tmp_path)
    if case == "empty":
        ref, match = "", r"--llm is empty"
    elif case == "folder without config.json":
        (tmp_path / "m").mkdir()
        ref, match = "m", r"--llm m: not a model folder \(it has no config.json\)"
    elif case == "damaged gguf":
        (tmp_path / "bad.gguf").write_bytes(b"GGUFxxxx")
        ref, match = "bad.gguf", r"--llm bad.gguf: cannot load the model or tokenizer from .* \(\w+: "
    else:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text('{"model_type": "no-such-architecture"}')
        ref, match = "m", r"--llm m: cannot load the model or tokenizer from m \(\w+: "
    with pytest.raises(SemrouteError, match=match):
        load_llm(ref, device="cpu", dtype="float32")


def test_an_instruction_that_is_not_utf8_is_refused_before_the_llm_loads(tmp_path, monkeypatch):
    """``--instruction $'\\xff'``: the shell hands Python lone surrogates, which the tokenizer met as a TypeError."""
    import semroute.stage1_encode.text as text_mod
    from semroute.shared.errors import SemrouteError

    monkeypatch.setattr(text_mod, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded first"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "a red square"}\n')
    with pytest.raises(SemrouteError, match=r"--instruction holds a lone surrogate '\\udcff' at character 1"):
        encode_text(EncodeTextConfig(data=str(manifest), out=str(tmp_path / "c.zarr"), llm="x", instruction="\udcff"))
    assert not (tmp_path / "c.zarr").exists()
