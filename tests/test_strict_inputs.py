"""Inputs that used to be read with a silent choice made for the user: a key given twice in a JSON record, a run
record, ``--storage-options``, a prompt file or a YAML config (the last one won); data after a JSON manifest's
array (left out unread); an empty ``--config`` (the working folder) or ``--cache-dir`` (no shard cache); a
tracker that is not installed (no tracker at all)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from semroute.shared.checks import DuplicateKey, json_object, loads_json, raw_decode_json, read_json_object
from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.manifest import read_manifest, read_problem_report
from semroute.stage2_train.config import TrainConfig, load_yaml
from semroute.stage2_train.prompt_files import PromptFileError, detect_format, read_prompts

TWICE = r'the key "text" is given twice in one object'


# -- the helper --------------------------------------------------------------------------------------------


def test_a_repeated_key_is_named_where_its_second_one_starts():
    with pytest.raises(DuplicateKey) as caught:
        loads_json('{"a": {"b": 1},\n "x": [{"k": 1}, {"k": 2,\n   "k": 3}]}')
    assert (caught.value.key, caught.value.lineno, caught.value.colno) == ("k", 3, 4)
    assert isinstance(caught.value, json.JSONDecodeError)  # the readers' handlers of malformed JSON catch it
    with pytest.raises(DuplicateKey, match=r'"a" is given twice.*column 14'):
        raw_decode_json('xx [{"a": 1, "a": 2}] yy', 3)


def test_objects_without_repeats_read_as_before():
    text = '{"a": {"k": 1}, "b": [{"k": 2}, {"k": 3}], "c": {}}'
    assert loads_json(text) == json.loads(text)
    assert raw_decode_json("[1, {}] tail", 0) == ([1, {}], 7)


def test_storage_options_and_json_files_refuse_a_repeated_key(tmp_path):
    with pytest.raises(SemrouteError, match=r'^--storage-options: the key "key" is given twice.*\(column 29\)'):
        json_object('{"key": "a", "secret": "b", "key": "c"}', "--storage-options")
    record = tmp_path / "run.json"
    record.write_text('{\n  "step": 4,\n  "step": 8\n}\n')
    with pytest.raises(SemrouteError, match=rf"^{record}:3: the key \"step\" is given twice.*; restore it$"):
        read_json_object(record, "restore it")


# -- manifests ---------------------------------------------------------------------------------------------


def test_jsonl_manifest_refuses_a_repeated_caption_key(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"image": "a.png", "text": "x"}\n{"image": "b.png", "text": "x", "text": "y"}\n')
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: {TWICE}.*\(column 33\)"):
        read_manifest(p, need_image=True)
    kept = read_manifest(p, need_image=True, skip_bad=True)  # a bad record like any other: listed, left out
    assert [r.image for r in kept.records] == ["a.png"]
    assert [(q.line, "is given twice" in q.reason) for q in kept.problems] == [(2, True)]


def test_json_array_manifest_refuses_a_repeated_key_on_its_line(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[\n {"image": "a.png",\n  "text": "x",\n  "text": "y"},\n {"image": "b.png", "text": "z"}\n]\n')
    with pytest.raises(ManifestError, match=rf"m\.json:2: {TWICE}.*\(line 4, column 3\)"):
        read_manifest(p, need_image=True)
    kept = read_manifest(p, need_image=True, skip_bad=True)  # the next record is still found
    assert [(r.image, r.texts) for r in kept.records] == [("b.png", ("z",))]


@pytest.mark.parametrize("text, line", [
    ('[{"image": "a.png", "text": "x"}] {"image": "b.png", "text": "y"}\n', 1),
    ('[{"image": "a.png", "text": "x"}]]\n', 1),
    ('[\n{"image": "a.png", "text": "x"}\n]\n\n[{"image": "b.png", "text": "y"}]\n', 5),
])
def test_json_array_manifest_refuses_data_after_its_closing_bracket(tmp_path, text, line):
    p = tmp_path / "m.json"
    p.write_text(text)
    with pytest.raises(ManifestError, match=rf"m\.json:{line}: data after the JSON array's closing '\]'"):
        read_manifest(p, need_image=True, skip_bad=True)  # not a bad record: the file is cut wrong
    p.write_text('[{"image": "a.png", "text": "x"}]\n \n')  # trailing blank lines are fine
    assert len(read_manifest(p, need_image=True).records) == 1


def test_problem_report_with_a_repeated_key_is_damaged(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"path": "m.jsonl", "line": 2, "line": 3, "reason": "x"}\n')
    with pytest.raises(SemrouteError, match=r"line 1 is damaged \(DuplicateKey: the key \"line\" is given twice"):
        read_problem_report(p)


# -- prompt files ------------------------------------------------------------------------------------------


def test_prompt_files_refuse_a_repeated_key(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "prompt": "a fox"}\n')
    with pytest.raises(PromptFileError, match=r'p\.jsonl:2: the key "prompt" is given twice'):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "a cat", "prompt": "a fox"}\n')  # on the line the format is detected from
    with pytest.raises(PromptFileError, match=r'p\.jsonl:1: the key "prompt" is given twice'):
        detect_format(jsonl)
    keyed = tmp_path / "genai_image.json"
    keyed.write_text('{\n "00001": {"id": "00001", "prompt": "a cat"},\n "00001": {"id": "00001", "prompt": "b"}\n}\n')
    with pytest.raises(PromptFileError, match=r'genai_image\.json:3: the key "00001" is given twice'):
        detect_format(keyed)
    with pytest.raises(PromptFileError, match=r'genai_image\.json:3: the key "00001" is given twice'):
        read_prompts(keyed, "genaibench")


# -- the training config -------------------------------------------------------------------------------------


def test_yaml_config_refuses_a_repeated_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fusion: depth\nlr: 1e-4\nbatch_size: 4\nlr: 3e-4\n")
    with pytest.raises(SemrouteError, match=rf"^config file {cfg}:4: key 'lr' is given twice \(first on line 2\)"):
        TrainConfig.build(config_file=str(cfg))
    cfg.write_text("model:\n  adaln: true\n  num_blocks: 2\n  adaln: false\n")
    with pytest.raises(SemrouteError, match=r"c\.yaml:4: key 'adaln' is given twice \(first on line 2\)"):
        load_yaml(cfg)
    cfg.write_text("base: &b {lr: 1.0e-4, seed: 1}\nmodel:\n  <<: *b\n  lr: 2.0e-4\n")  # a merge may be overridden
    assert load_yaml(cfg)["model"] == {"lr": 2.0e-4, "seed": 1}


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_config_is_refused(spec):
    with pytest.raises(SemrouteError, match=r"^--config is empty; give a YAML file or a config name: .*paper/joint"):
        TrainConfig.build(config_file=spec)


def test_a_folder_as_config_is_named(tmp_path):
    with pytest.raises(SemrouteError, match=rf"^cannot read config file {tmp_path}: "):
        TrainConfig.build(config_file=str(tmp_path))


def test_an_empty_cache_dir_is_refused_by_its_flag():
    with pytest.raises(SemrouteError, match=r"^--cache-dir is '': name a folder"):
        TrainConfig.build(cache_dir="", flags={"cache_dir": "--cache-dir"})
    with pytest.raises(SemrouteError, match=r"^--set 'cache_dir=3': cache_dir is 3"):
        TrainConfig.build(overrides=["cache_dir=3"])
    assert TrainConfig.build(cache_dir="/scratch/shards").cache_dir == "/scratch/shards"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_refused():
    cfg = TrainConfig(report_to="wandb")  # a run's saved config still reads (sample, export need no tracker)
    with pytest.raises(SemrouteError, match=r"^--report-to wandb: the wandb package is not installed; pip install "
                                            r"wandb, or use --report-to tensorboard\|none$"):
        cfg.check_tracker()
    TrainConfig(report_to="tensorboard").check_tracker()
    TrainConfig(report_to="none").check_tracker()


def test_a_set_value_refuses_a_repeated_key():
    with pytest.raises(SemrouteError, match=r"^--set 'expect_latent=\{channels: 16, channels: 12\}': the value is not "
                                            r"valid YAML \(key 'channels' is given twice"):
        TrainConfig.build(overrides=["expect_latent={channels: 16, channels: 12}"])
    assert TrainConfig.build(overrides=["expect_latent={channels: 16}"]).expect_latent == {"channels": 16}


@pytest.mark.parametrize("text, line, message", [
    ('[{"image": "a.png", "text": "a"}\n {"image": "b.png", "text": "b"}]', 2, "expected ',' or ']' after the record "
                                                                              "ending on line 1"),
    ('[{"image": "a.png", "text": "a"},\n,{"image": "b.png", "text": "b"}]', 2, "two ','s with no record between"),
    ('[{"image": "a.png", "text": "a"},\n]', 2, "a ',' after the last record"),
    ('[,\n{"image": "a.png", "text": "a"}]', 1, "a ',' before the first record"),
    ('[{"image": "a.png", "text": "a"},\n', 2, "the JSON array is not closed"),
])
def test_json_array_manifest_refuses_missing_or_extra_commas(tmp_path, text, line, message):
    """Its records are parsed one by one; the commas between them were skipped however many there were."""
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=rf"^{path}:{line}: .*{message}"):
        read_manifest(path, need_image=True, skip_bad=True)


def test_json_array_manifest_with_commas_in_place_reads_every_record(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[ {"image": "a.png", "text": "a"} ,\n  {"image": "b.png", "text": "b"}\n]\n')
    assert [r.texts for r in read_manifest(path, need_image=True).records] == [("a",), ("b",)]
    path.write_text("[]")
    with pytest.raises(ManifestError):  # (no records: refused as before, for being empty)
        read_manifest(path, need_image=True)
