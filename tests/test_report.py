"""``semroute report``: one static HTML page with the curves, routing heatmaps, sample grids, config and
fingerprints of one or several runs."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.report import write_report
from semroute.stage2_train.train import train
from testkit import run_cli


@pytest.fixture(scope="module")
def two_runs(square_caches, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    text, latents, _ = square_caches
    runs = []
    for fusion in ("static", "depth"):
        cfg = TrainConfig(text_cache=text, latent_cache=latents, out=str(root / fusion), fusion=fusion, preset="tiny",
                          batch_size=8, num_workers=0, report_to="none", log_every=2, max_steps=12,
                          checkpoint_every=6, holdout=8, validate_every=4, val_samples=2, val_sample_steps=2,
                          ema=fusion == "depth", ema_decay=0.9, lr=1e-3)
        train(cfg, progress=False)
        runs.append(Path(cfg.out))
    return runs


class _Page(HTMLParser):
    """Collects what a browser would load or run: tags, image sources, svg text, table cells."""

    def __init__(self):
        super().__init__()
        self.tags, self.img_src, self.svg_text, self.cells, self._stack = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._stack.append(tag)
        if tag == "img":
            self.img_src.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "text" in self._stack and data.strip():
            self.svg_text.append(data.strip())
        if self._stack and self._stack[-1] in ("td", "b") and data.strip():
            self.cells.append(data.strip())


def _parse(path: Path) -> tuple[str, _Page]:
    page = path.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(page)
    return page, parser


def test_one_run_page_has_curves_heatmaps_samples_config_and_fingerprints(two_runs, tmp_path):
    run = two_runs[1]
    out = write_report([run], tmp_path / "one.html")
    page, p = _parse(out)
    assert sum(tag == "svg" for tag, _ in p.tags) == 3  # training loss, validation loss, loss per sigma
    assert {"Training loss", "Validation loss (mean over noise levels)"} <= set(p.svg_text)
    assert "depth (EMA)" in p.svg_text  # the EMA validation curve is drawn and labelled
    # Heatmaps at the checkpoints (6, 12) and sample grids at the validations (4, 8, 12), embedded.
    alts = [a["alt"] for t, a in p.tags if t == "img"]
    assert alts == ["routing at step 6", "routing at step 12", "samples at step 4", "samples at step 8",
                    "samples at step 12"]
    assert all(src.startswith("data:image/png;base64,") for src in p.img_src)
    record = json.loads((run / "run.json").read_text())
    assert record["text_fingerprint"]["llm_weights_sha256"] in page
    assert "latent cache" in page and "pixel" in page
    assert "fusion: depth" in page and "holdout: 8" in page  # the resolved config
    # The table shows the last validation's numbers as logged.
    last = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if r.get("event") == "validation"][-1]
    assert f"{last['val_loss']:.4f}" in p.cells and f"{last['val_loss_ema']:.4f}" in p.cells


def test_several_runs_overlay_and_compare_with_checker_scores(two_runs, tmp_path):
    static, depth = two_runs
    # The demo writes its checker summary beside its run: report.json naming the run.
    demo = {"run_dir": str(depth), "samples": {"overall": 0.512, "per_tag": {"single_object": 0.9, "colors": 0.7}}}
    (depth.parent / "report.json").write_text(json.dumps(demo))
    try:
        out = run_cli("report", str(static), str(depth), "--out", str(tmp_path / "cmp.html"))
    finally:
        (depth.parent / "report.json").unlink()
    assert "2 run(s)" in out.stdout
    page, p = _parse(tmp_path / "cmp.html")
    for title in ("Training loss", "Validation loss (mean over noise levels)"):
        assert title in p.svg_text
    assert {"static", "depth"} <= set(p.svg_text)  # both runs in the legends of the overlaid charts
    table = re.search(r'<table id="comparison">(.*?)</table>', page, re.S).group(1)
    assert table.count("<tr>") == 3 and "static" in table and "depth" in table
    assert "0.512" in table and "0.900" in table and "single_object" in table
    assert len(p.img_src) == 2 * 5


def test_page_needs_nothing_from_the_network(two_runs, tmp_path):
    page, p = _parse(write_report(two_runs, tmp_path / "r.html"))
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe")]
    for tag, attrs in p.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http:", "https:", "//")), (tag, value)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(SemrouteError, match="not a training run folder"):
        write_report([tmp_path], tmp_path / "x.html")


def test_report_and_info_leave_out_log_rows_they_cannot_read(two_runs, tmp_path, capsys):
    import shutil

    from semroute.stage2_train.run_info import describe_run

    run = tmp_path / "run"
    shutil.copytree(two_runs[1], run)
    rows = [{"step": 3, "event": "validation"}, {"step": 5}, {"loss": 1.0}, {"step": 7, "loss": "x"},
            {"step": "8", "loss": 0.5}, {"step": 99, "loss": 0.25}]  # the last: a row of an older version's keys
    with open(run / "logs" / "metrics.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    page, _ = _parse(write_report([run], tmp_path / "r.html"))
    assert "left out 5 unreadable line(s)" in capsys.readouterr().err
    info = describe_run(str(run))
    assert info["steps done"] == 99 and info["last log"]["loss"] == 0.25 and info["last log"]["lr"] is None
    assert "routing (sigma 0.5)" not in info
