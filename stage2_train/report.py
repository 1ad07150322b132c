"""``semroute report RUN [RUN ...] --out FILE.html``: one self-contained HTML page per set of runs.

Everything is read from the run folders (``logs/metrics.jsonl``, ``run.json``, ``config.yaml``,
``routing/step-*.png``, ``samples/step-*.png``, and the checker's scores when the demo wrote a
``report.json`` for the run) and written into one file: charts as inline SVG drawn by matplotlib, images
as base64 PNGs, no script and no external resource, so it opens offline in any browser and can be
mailed around. With several runs their curves share axes and a table compares their final validation
losses (and checker scores), which is how strategies are compared.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from semroute.shared.checks import read_json_object
from semroute.shared.errors import SemrouteError
from semroute.shared.files import write_atomic
from semroute.shared.interrupts import stoppable

MAX_IMAGES = 12  # routing heatmaps / sample grids shown per run, evenly spaced over training


@dataclass
class RunData:
    """What the report shows of one run folder."""

    path: Path
    name: str
    config: dict
    record: dict
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss (last logged wins)
    validations: list[dict] = field(default_factory=list)  # metrics.jsonl's validation events, by step
    routing: list[tuple[int, Path]] = field(default_factory=list)
    samples: list[tuple[int, Path]] = field(default_factory=list)
    checker: dict | None = None  # the demo's shape-checker summary of this run's samples

    @property
    def final_validation(self) -> dict | None:
        return self.validations[-1] if self.validations else None


def _steps_of(folder: Path) -> list[tuple[int, Path]]:
    from semroute.stage2_train.run_folder import CHECKPOINT_PREFIX

    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"{CHECKPOINT_PREFIX}*.png"):
        try:
            found.append((int(p.stem.removeprefix(CHECKPOINT_PREFIX)), p))
        except ValueError:
            continue
    return sorted(found)


def _checker_scores(run: Path) -> dict | None:
    """The demo's report.json for this run: in the run folder, or beside it naming it as its run."""
    for candidate in (run / "report.json", run.parent / "report.json"):
        if not candidate.exists():
            continue
        data = read_json_object(candidate, "it is the demo's report: delete it, or run the demo again to rewrite it")
        named = data.get("run_dir")
        if candidate.parent == run or (named and Path(named).resolve() == run.resolve()):
            return data.get("samples")
    return None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    from semroute.stage2_train.run_folder import RunFolder

    run = RunFolder(path)
    record = run.record()  # a clear error for a folder that is not a run
    config = run.config().to_dict() if run.config_path.exists() else {}
    data = RunData(run.path, name or run.path.name, config, record)
    validations: dict[int, dict] = {}
    try:
        rows = run.metrics()
    except json.JSONDecodeError as err:
        raise SemrouteError(f"{run.metrics_path}: not JSON lines ({err})") from None
    for row in rows:
        if row.get("event") == "validation":
            validations[row["step"]] = row  # a resumed run may validate a step again: keep the latest
        elif "loss" in row and row.get("event") is None:
            data.losses[int(row["step"])] = float(row["loss"])
    data.validations = [validations[s] for s in sorted(validations)]
    data.routing = _steps_of(run.routing_dir)
    data.samples = _steps_of(run.samples_dir)
    data.checker = _checker_scores(run.path)
    return data


# -- drawing ----------------------------------------------------------------------------------------
def _svg(fig) -> str:
    """A matplotlib figure as an inline ``<svg>`` element (text kept as text, so it stays searchable)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "semroute"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _chart(series: list[tuple[str, list, list, str]], title: str, xlabel: str, ylabel: str, log_y: bool = False,
           log_x: bool = False) -> str:
    """``series``: (label, xs, ys, line style). An empty chart says so instead of drawing axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in series if s[1]]
    if not series:
        return f'<p class="empty">{html.escape(title)}: nothing logged yet.</p>'
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(label.split(" (")[0] for label, *_ in series))
    for label, xs, ys, style in series:
        color = colors[names.index(label.split(" (")[0]) % len(colors)]
        ax.plot(xs, ys, style, color=color, label=label, linewidth=1.4, markersize=3)
    values = [y for _, _, ys, _ in series for y in ys if y is not None and y > 0]
    if log_y and values and max(values) > 5 * min(values):  # log only where it spreads the curves out
        ax.set_yscale("log")
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _spread(items: list, n: int = MAX_IMAGES) -> list:
    """At most ``n`` items, evenly spaced, always keeping the first and the last."""
    if len(items) <= n:
        return items
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- the page ---------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .charts svg { max-width: 100%; height: auto; }
.multiples { display: flex; flex-wrap: wrap; gap: 10px; }
.multiples figure { margin: 0; } .multiples img { width: 260px; border: 1px solid #eee; }
.grids figure { margin: 8px 0; } .grids img { max-width: 100%; border: 1px solid #eee; image-rendering: pixelated; }
figcaption { font-size: 0.8em; color: #555; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
.empty { color: #888; font-style: italic; }
"""


def _comparison(runs: list[RunData]) -> str:
    tags = list(dict.fromkeys(t for r in runs if r.checker for t in r.checker.get("per_tag", {})))
    head = ["run", "fusion", "steps", "train loss", "val loss", "val loss (EMA)"] + tags + (
        ["checker overall"] if tags else [])
    rows = []
    for r in runs:
        v = r.final_validation or {}
        last_step = max(r.losses) if r.losses else None
        cells = [f'<td class="l">{html.escape(r.name)}</td>', f'<td class="l">{html.escape(str(r.config.get("fusion", "?")))}</td>',
                 f"<td>{last_step if last_step is not None else '–'}</td>",
                 f"<td>{_fmt(r.losses[last_step] if last_step is not None else None)}</td>",
                 f"<td>{_fmt(v.get('val_loss'))}</td>", f"<td>{_fmt(v.get('val_loss_ema'))}</td>"]
        if tags:
            per_tag = (r.checker or {}).get("per_tag", {})
            cells += [f"<td>{_fmt(per_tag.get(t), 3)}</td>" for t in tags]
            cells.append(f"<td><b>{_fmt((r.checker or {}).get('overall'), 3)}</b></td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f'<th class="{"l" if h in ("run", "fusion") else ""}">{html.escape(h)}</th>' for h in head)
    note = ("<p>Validation losses: the last validation of each run, mean over the fixed noise levels; runs are "
            "comparable when they hold out the same samples (same caches, <code>holdout</code> and seed).</p>")
    return f"<table id=\"comparison\"><tr>{header}</tr>{''.join(rows)}</table>{note}"


def _charts(runs: list[RunData]) -> str:
    loss = _chart([(r.name, sorted(r.losses), [r.losses[s] for s in sorted(r.losses)], "-") for r in runs],
                  "Training loss", "step", "flow-matching loss", log_y=True)
    val_series = []
    for r in runs:
        steps = [v["step"] for v in r.validations]
        val_series.append((r.name, steps, [v["val_loss"] for v in r.validations], "o-"))
        if any("val_loss_ema" in v for v in r.validations):
            val_series.append((f"{r.name} (EMA)", steps, [v.get("val_loss_ema") for v in r.validations], "s--"))
    val = _chart(val_series, "Validation loss (mean over noise levels)", "step", "held-out loss")
    sigma_series = []
    for r in runs:
        last = r.final_validation
        if last:
            pairs = sorted((float(k), v) for k, v in last["val_loss_sigma"].items())
            sigma_series.append((f"{r.name} (step {last['step']})", [p[0] for p in pairs], [p[1] for p in pairs], "o-"))
    per_sigma = _chart(sigma_series, "Validation loss per noise level (last validation)", "sigma", "held-out loss",
                       log_y=True)
    return f'<div class="charts">{loss}{val}{per_sigma}</div>'


def _fingerprints(record: dict) -> str:
    rows = []
    for which in ("text", "latent"):
        fp = record.get(f"{which}_fingerprint") or {}
        rows.append(f'<tr><th class="l" colspan="2">{which} cache: {html.escape(str(record.get(f"{which}_cache", "?")))}</th></tr>')
        for key, value in fp.items():
            text = json.dumps(value) if not isinstance(value, str) else value
            if len(text) > 160:
                text = text[:157] + "..."
            rows.append(f'<tr><td class="l">{html.escape(key)}</td><td class="l"><code>{html.escape(text)}</code></td></tr>')
    return f'<table class="fingerprints">{"".join(rows)}</table>'


def _over_training(title: str, what: str, images: list, css_class: str, empty: str) -> str:
    """A heading and up to MAX_IMAGES of ``images`` (``(step, png path)``, evenly spread), or ``empty`` (HTML)."""
    if not images:
        return f'<h3>{title}</h3>\n<p class="empty">{empty}</p>'
    figs = "".join(f'<figure><img alt="{what} at step {s}" src="{_png(p)}"><figcaption>step {s}</figcaption></figure>'
                   for s, p in _spread(images))
    return f'<h3>{title}</h3>\n<div class="{css_class}">{figs}</div>'


def _run_section(r: RunData, idx: int) -> str:
    parts = [f'<h2 id="run-{idx}">{html.escape(r.name)}</h2>',
             f"<p><code>{html.escape(str(r.path))}</code> · fusion <b>{html.escape(str(r.config.get('fusion', '?')))}</b>"
             f" · preset {html.escape(str(r.config.get('preset', '?')))} · "
             f"{len(r.record.get('holdout', {}).get('sample_ids', []))} held-out samples</p>"]
    if r.checker:
        parts.append("<p>Shape checker on the demo's samples: overall <b>"
                     f"{_fmt(r.checker.get('overall'), 3)}</b> (" + ", ".join(
                         f"{html.escape(t)} {_fmt(v, 3)}" for t, v in r.checker.get("per_tag", {}).items()) + ")</p>")
    parts.append(_over_training("Routing over training", "routing", r.routing, "multiples",
                                "No routing heatmap (no checkpoint yet, or a strategy without gates)."))
    parts.append(_over_training("Samples of held-out captions over training", "samples", r.samples, "grids",
                                "No sample grids (train with <code>--holdout N</code> to get them)."))
    parts.append("<h3>Caches</h3>" + _fingerprints(r.record))
    parts.append("<details><summary>Resolved configuration</summary><pre>"
                 + html.escape(yaml.safe_dump(r.config, sort_keys=False)) + "</pre></details>")
    return "\n".join(parts)


def write_report(runs: list[str | Path], out: str | Path, *, title: str = "semroute runs") -> Path:
    """Write the HTML report of ``runs`` to ``out``; returns its path."""
    if not runs:
        raise SemrouteError("give at least one run folder")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm") or out.is_dir():
        # (so that a slip of --out never writes over a run's config.yaml, run.json or anything else)
        raise SemrouteError(f"--out {out}: the report is one HTML page; give a file name ending in .html")
    names = [Path(r).name for r in runs]
    # Runs of the same name (demo_out/run-depth, other/run-depth) are told apart by their parent.
    labels = [f"{Path(r).parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]
    data = [load_run(r, name) for r, name in zip(runs, labels)]
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>" + " · ".join(f'<a href="#run-{i}">{html.escape(r.name)}</a>' for i, r in enumerate(data)) + "</p>",
            "<h2>Comparison</h2>", _comparison(data), _charts(data)]
    body += [_run_section(r, i) for i, r in enumerate(data)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    with stoppable(f"{out} was not written (an earlier one there is kept whole): run the same command again"):
        write_atomic(out, page)  # an earlier report stays whole until the new one is
    return out
