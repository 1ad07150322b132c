"""Edges of the inputs (shared/sources.py, shared/remote.py): brace ranges too long to list, bad table rows,
unreachable or unsupported input URLs, local paths that are mistyped URLs (``s3:/x``), sizes below one byte."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semroute.shared import remote, sources
from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.sources import expand, read_source, require_local_inputs
from testkit import CHECKOUT_PRELUDE, CLI, write_manifest, write_square_images


# -- brace ranges: counted before they are listed --------------------------------------------------------------------
def _run_limited(*args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` in a process limited to 4 GiB of address space: were the names of a huge range listed (as
    expand did), it would fail there with a MemoryError instead of filling this machine."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("pattern", ["x-{0..999999999999}.tar", "x-{0..999}{0..999}{0..999}{0..999}.tar"])
def test_a_brace_range_too_long_is_refused_before_a_name_is_made(pattern):
    """10**12 names: refused from the count alone."""
    proc = _run_limited("-c", CHECKOUT_PRELUDE + f"from semroute.shared.sources import expand\nexpand({pattern!r})")
    assert proc.returncode != 0 and "MemoryError" not in proc.stderr, proc.stderr[-2000:]
    assert f"SemrouteError: {pattern}: its braces expand to 1,000,000,000,000 names, more than the 1,000,000" \
        in proc.stderr, proc.stderr[-2000:]


def test_the_expansion_cap_counts_every_part(monkeypatch):
    monkeypatch.setattr(sources, "MAX_EXPANDED", 4)
    assert expand("x-{0..3}.tar") == ["x-0.tar", "x-1.tar", "x-2.tar", "x-3.tar"]
    with pytest.raises(SemrouteError, match=r"a\.tar::x-\{0\.\.3\}\.tar: its braces expand to 5 names, more than "
                                            r"the 4 one DATA may have"):
        expand("a.tar::x-{0..3}.tar")
    monkeypatch.setenv("WDS_N", "{0..9}")  # webdataset's ${N} is substituted before braces are expanded
    with pytest.raises(SemrouteError, match="expand to 10 names"):
        expand("x-${N}.tar")


@pytest.mark.parametrize("pattern", [
    "x-{000..012}.tar", "{4..1}", "{2..-1}", "{1..10..0}", "{1..10..-3}", "{-5..5..2}", "{07..10}", "{a..g..2}",
    "{Z..a}", "{g..a..3}", "python{2.{5..7},3.{2,3}}", r"{1\{2,3}", "{a}", "{}", "{,}", "{a,}", "x{a,b{1..3},{}}y",
    "{{a,b}}", "{a,{b,c}{1..2}}{0..1}", "}{", "{a}{b,c}", "{0..1..}", "{\\,a,b}"])
def test_the_count_is_what_braceexpand_makes(pattern):
    from braceexpand import braceexpand

    assert sources._expansion_size(pattern) == len(list(braceexpand(pattern)))


def test_a_brace_range_too_long_is_named_before_the_model_loads(tmp_path):
    proc = _run_limited(str(CLI), "encode-text", str(tmp_path / "x-{0..99999999}.tar"), "--llm",
                        str(tmp_path / "no-model"), "--out", str(tmp_path / "t.text.zarr"), "--no-progress")
    assert proc.returncode == 1 and "braces expand to 100,000,000 names" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "t.text.zarr").exists()


# -- a bad table row is a bad record: an error naming file, row and column, or with --skip-bad left out ---------------
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_an_empty_or_null_caption_in_a_table_stops_the_run_unless_skip_bad(tmp_path, kind):
    path = tmp_path / f"t.{kind}"
    if kind == "csv":
        path.write_text('id,caption\na,first\nb,\nc,third\n')
        reason = "'caption' is empty"
    else:
        pq.write_table(pa.table({"id": ["a", "b", "c"], "caption": ["first", None, "third"]}), path)
        reason = "'caption' is NoneType"
    with pytest.raises(ManifestError, match=rf"t\.{kind}: row 1: {reason}.*\(or pass --skip-bad to leave it out\)"):
        read_source(path, text_key="caption")
    src = read_source(path, text_key="caption", skip_bad=True)
    assert [r.sample_id for r in src.records] == ["a", "c"]
    assert [(p.path, p.line) for p in src.problems] == [(str(path), 2)] and reason in src.problems[0].reason


def test_a_table_row_without_its_image_stops_the_run_unless_skip_bad(tmp_path):
    pq.write_table(pa.table({"image": ["a.jpg", ""], "text": ["x", "y"]}), tmp_path / "t.parquet")
    with pytest.raises(ManifestError, match=r"t\.parquet: row 1: 'image' must be a non-empty path string"):
        read_source(tmp_path / "t.parquet", need_image=True)
    assert [r.image for r in read_source(tmp_path / "t.parquet", need_image=True, skip_bad=True).records] == ["a.jpg"]


# -- input URLs that cannot be read: named, with what to do ---------------------------------------------------------
def test_an_unreachable_http_input_says_so(monkeypatch):
    """fsspec's HTTP filesystem raises a refused connection as FileNotFoundError: not a missing bucket or file."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)
    for data in ("http://127.0.0.1:1/x.tar", "http://127.0.0.1:1/x.parquet"):
        with pytest.raises(SemrouteError) as err:
            read_source(data, need_text=True)
        assert str(err.value).startswith(f"cannot reach the server for {data} after 6 tries"), err.value
        assert "Check the address, that the server runs and the network" in str(err.value)
        assert "bucket" not in str(err.value) and "does not exist" not in str(err.value)


def test_a_missing_http_input_is_no_missing_bucket(tmp_path):
    """A server on 127.0.0.1 answering 404: the object is named as missing; an HTTP URL has no bucket."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path))) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/nope.tar"
        try:
            with pytest.raises(SemrouteError, match=rf"^cannot read {re.escape(url)}: there is no such object; check "
                                                    "the URL$"):
                read_source(url, need_text=True)
        finally:
            server.shutdown()


@pytest.mark.parametrize("data", ["s3://bkt/x.jsonl", "http://127.0.0.1:1/m.json"])
def test_a_manifest_url_is_refused_naming_it(data):
    """read_manifest (shared/manifest.py) reads a local file: a URL was read as a local path ("no such file")."""
    for check in (require_local_inputs, read_source):  # the first before the model loads
        with pytest.raises(SemrouteError, match=rf"^{re.escape(data)}: a JSON/JSONL manifest is read from a local "
                                                "file, not a URL; copy it here first"):
            check(data)


def test_no_credentials_for_an_s3_input_says_so(monkeypatch):
    """An endpoint in --storage-options but no key anywhere: botocore's NoCredentialsError, named as such."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata request (not loopback)
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    with pytest.raises(SemrouteError, match=r"^s3://bkt/x\.tar: no credentials for the object store .*Set "
                                            r"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY .*--storage-options"):
        read_source("s3://bkt/x.tar", need_text=True, storage_options={"endpoint_url": "http://127.0.0.1:1"})
    S3FileSystem.clear_instance_cache()


def test_a_missing_input_object_is_named_as_an_input(s3):
    """A reachable store without the object: not "deleted while this job ran? run verify on the cache"."""
    with pytest.raises(SemrouteError, match=r"^cannot read s3://bkt/nope\.tar: there is no such object; check the URL"):
        read_source("s3://bkt/nope.tar", need_text=True)
    with pytest.raises(SemrouteError, match=r"^s3://nobkt/x\.parquet: the bucket 'nobkt' does not exist"):
        read_source("s3://nobkt/x.parquet", need_text=True)


# -- a local path that is a mistyped URL ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, fix", [("s3:/bkt/x.zarr", "s3://bkt/x.zarr"), ("gs:bkt/x", "gs://bkt/x"),
                                       ("HTTP:/host/x.tar", "HTTP://host/x.tar"), ("s3:", "s3://")])
def test_a_url_missing_a_slash_is_refused(path, fix):
    with pytest.raises(SemrouteError, match=rf"^{re.escape(path)}: not a URL .* write {re.escape(fix)} "
                                            rf"\(or \./{re.escape(path)} for such a local path\)"):
        remote.is_url(path)


@pytest.mark.parametrize("path", ["./s3:/x", "data/s3:/x", "c:/x", "run:1/x", "x.tar::y.tar", "s3x:/y", ""])
def test_local_paths_with_colons_stay_local(path):
    assert remote.is_url(path) is False
    assert remote.is_url("s3://bkt/x") is True


def test_an_encode_into_a_mistyped_url_writes_nothing(tmp_path, monkeypatch, tiny_llama_dir):
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SemrouteError, match=r"^s3:/x\.zarr: not a URL .*write s3://x\.zarr"):
        encode_images(EncodeImagesConfig(data=str(manifest), out="s3:/x.zarr", vae="pixel", resolution=32,
                                         device="cpu", workers=0, progress=False))
    def no_load(*args, **kwargs):
        raise AssertionError("the LLM was loaded before --out was checked")

    monkeypatch.setattr("semroute.stage1_encode.text.load_llm", no_load)  # named before minutes of loading
    with pytest.raises(SemrouteError, match=r"^s3:/x\.zarr: not a URL"):
        encode_text(EncodeTextConfig(data=str(manifest), out="s3:/x.zarr", llm=str(tiny_llama_dir), dtype="float32",
                                     device="cpu", progress=False))
    with pytest.raises(SemrouteError, match=r"^gs:/d-0\.tar: not a URL"):
        require_local_inputs("gs:/d-{0..1}.tar")  # an input too (each expanded name is checked)
    assert not (tmp_path / "s3:").exists()


# -- sizes ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("20G", 20 << 30), ("1.5T", int(1.5 * (1 << 40))), ("512MiB", 512 << 20),
                                        ("1000000", 1000000), ("1", 1)])
def test_sizes(text, size):
    assert remote.parse_size(text) == size


@pytest.mark.parametrize("text", ["-5G", "0", "-1", "0G", "1e-12G", "infG", "nanG", "1e400G", "-0.5k"])
def test_a_size_below_one_byte_or_not_finite_is_refused(text):
    with pytest.raises(SemrouteError, match=rf"size '{text}' is not a size"):
        remote.parse_size(text)


def test_train_refuses_a_negative_cache_size_naming_the_flag(tmp_path):
    """parse_size's refusal reaches the user as the option's (or the --set's) error (TrainConfig.build)."""
    from typer.testing import CliRunner

    from semroute.cli import app

    for given, named in ((["--cache-size=-5G"], "--cache-size '-5G'"), (["--set", "cache_size=0"], "cache_size '0'")):
        result = CliRunner().invoke(app, ["train", "--text-cache", str(tmp_path / "t.zarr"), "--latent-cache",
                                          str(tmp_path / "l.zarr"), "--out", str(tmp_path / "run"), "--cache-dir",
                                          str(tmp_path / "shards"), "--no-progress", *given])
        assert isinstance(result.exception, SemrouteError) and named in str(result.exception), result.output
        assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_a_missing_input_object_is_named_before_the_llm_loads(s3, tmp_path, monkeypatch):
    """A URL input was first asked for when reading started, after the model load (minutes for a large LLM)."""
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    def no_load(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the input was asked for")

    monkeypatch.setattr("semroute.stage1_encode.text.load_llm", no_load)
    for data, message in (("s3://bkt/nope-{0..3}.tar", r"^cannot read s3://bkt/nope-0\.tar: there is no such object"),
                          ("s3://nobkt/x.parquet", r"^s3://nobkt/x\.parquet: the bucket 'nobkt' does not exist")):
        with pytest.raises(SemrouteError, match=message):
            encode_text(EncodeTextConfig(data=data, out=str(tmp_path / "t.zarr"), llm="unused", progress=False))
    assert not (tmp_path / "t.zarr").exists()
