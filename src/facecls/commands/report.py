"""``facecls report``: one self-contained HTML page about one or more run folders.

Everything the page shows comes from the files a run already holds (``run.json``, ``metrics.csv``,
``eval_<split>.json``, ``per_class_<split>.csv``, ``predictions_<split>.csv``, ``skipped_files.csv``)
and from the images in its data folder, shrunk to small JPEG thumbnails inlined as data URIs. Charts
are inline SVG (matplotlib's SVG backend). The page loads nothing from anywhere: it opens from disk,
offline, in any browser; a few lines of plain JavaScript filter the per-identity table.

Size at scale: thumbnails are bounded by the error gallery (``max_errors`` images x 3) and the
most-confused pairs (``MAX_PAIRS`` x 2); the per-identity table shows the worst ``WORST_ROWS``
identities and keeps the full list collapsed, as plain rows (about 60 bytes per identity).
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import numpy as np

from facecls.core import runs
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder
from facecls.data.scan import unescape_name

MAX_PAIRS = 20
"""most-confused identity pairs shown"""
WORST_ROWS = 25
"""identities shown in the open per-identity table; the full table is collapsed below it"""
EXAMPLES_PER_REASON = 5
"""example files listed per skip reason / prepare status"""
THUMB_PX = 72
THUMB_QUALITY = 75
CALIBRATION_BINS = 15


def esc(value: object) -> str:
    """HTML-escaped text; file names that are not UTF-8 (read with surrogateescape) show U+FFFD."""
    text = str(value)
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return html.escape(text, quote=True)


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


# ---- reading a run ----------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One row of ``predictions_<split>.csv``."""

    path: str
    identity: str
    correct: bool
    true_score: float
    top: list[tuple[str, float]]

    @property
    def predicted(self) -> str:
        return self.top[0][0]

    @property
    def score(self) -> float:
        return self.top[0][1]


def read_predictions(path: Path) -> list[Prediction]:
    """The rows of ``predictions_<split>.csv``, with file and identity names as they are on disk."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for r in rows:
        top = [(unescape_name(r[f"pred_{k}"]), float(r[f"score_{k}"])) for k in range(1, 6) if r.get(f"pred_{k}")]
        path, identity = unescape_name(r["path"]), unescape_name(r["identity"])
        out.append(Prediction(path, identity, r["correct"] == "1", float(r["true_score"]), top))
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return list(csv.DictReader(handle))


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def default_split(run: Path) -> str:
    """``test`` when the run has test results (or none at all yet), else ``val``."""
    if (run / "eval_test.json").is_file() or not (run / "eval_val.json").is_file():
        return "test"
    return "val"


@dataclass
class RunData:
    path: Path
    split: str
    info: dict
    evaluation: dict
    metrics: list[dict[str, str]]
    per_class: list[dict[str, str]]
    predictions: list[Prediction]
    data_dir: Path
    examples: dict[str, str]
    """identity -> one image path (relative to the data folder), preferably from the train split"""
    notes: list[str] = field(default_factory=list)


def load_run_data(run: Path, split: str | None, console: Console) -> RunData:
    """Read what the page needs from ``run``; evaluates once only when the per-image predictions are
    missing (a run evaluated before ``predictions_<split>.csv`` existed), and says so on the page."""
    run = Path(run)
    info = runs.read_run_info(run)
    split = split or default_split(run)
    notes = []
    predictions_csv = run / f"predictions_{split}.csv"
    if not predictions_csv.is_file() or not (run / f"eval_{split}.json").is_file():
        evaluated = _read_json(run / f"eval_{split}.json")
        checkpoint = evaluated["checkpoint"] if evaluated else "best"
        if not any((run / name).is_file() for name in ("best.ckpt", "last.ckpt")) and checkpoint in ("best", "last"):
            raise FaceclsError(
                f"{run} has no {predictions_csv.name} and no checkpoint to make it from; "
                f"run `facecls evaluate {run} --split {split}` where the checkpoint is"
            )
        from facecls.commands.evaluate import evaluate_run

        message = (
            f"{run} had no {predictions_csv.name}: evaluated its {checkpoint} checkpoint on the {split} split "
            "once to write it (the report itself never runs the model otherwise)"
        )
        console.log(message)
        evaluate_run(run, split, checkpoint=checkpoint, console=console, quiet=True)
        notes.append(message)
    evaluation = _read_json(run / f"eval_{split}.json") or {}
    data_dir = Path(info.get("data_dir", ""))
    examples: dict[str, str] = {}
    from facecls.data.split import read_manifest

    if (run / "split.csv").is_file():
        # prefer a training image as an identity's example: the one the model learnt from
        for row in sorted(read_manifest(run / "split.csv"), key=lambda r: r.split != "train"):
            examples.setdefault(row.identity, row.path)
    if not data_dir.is_dir():
        notes.append(f"data folder {data_dir} not found here: the images are left out of this page")
    return RunData(
        run,
        split,
        info,
        evaluation,
        runs.read_metrics(run / "metrics.csv"),
        read_csv(run / f"per_class_{split}.csv"),
        read_predictions(predictions_csv),
        data_dir,
        examples,
        notes,
    )


# ---- images and charts --------------------------------------------------------------------------------


class Thumbnails:
    """Small JPEG data URIs of images, each file decoded once per page."""

    def __init__(self, size: int = THUMB_PX, quality: int = THUMB_QUALITY):
        self.size, self.quality = size, quality
        self._cache: dict[Path, str | None] = {}
        self.unreadable: list[Path] = []

    @property
    def encoded(self) -> int:
        """how many different images the page holds"""
        return sum(uri is not None for uri in self._cache.values())

    def uri(self, path: Path) -> str | None:
        if path not in self._cache:
            self._cache[path] = self._encode(path)
        return self._cache[path]

    def _encode(self, path: Path) -> str | None:
        from PIL import ImageOps

        from facecls.data.images import UnreadableImage, open_rgb

        if not path.is_file():
            self.unreadable.append(path)
            return None
        try:
            image = open_rgb(path, min_size=self.size)
        except UnreadableImage:
            self.unreadable.append(path)
            return None
        image = ImageOps.fit(image, (self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def img(self, path: Path, alt: str, title: str = "", small: bool = False) -> str:
        uri = self.uri(path)
        kind = ' class="small"' if small else ""
        if uri is None:
            return f'<span class="noimg"{kind} title="{esc(path)}">no image</span>'
        tip = f' title="{esc(title)}"' if title else ""
        side = self.size // 2 if small else self.size
        return f'<img src="{uri}"{kind} alt="{esc(alt)}"{tip} width="{side}" height="{side}">'


def svg_of(fig, salt: str) -> str:
    """The figure as an inline ``<svg>`` element: text kept as text (small, selectable), element ids
    made unique per figure (several charts share one page), no date in the metadata."""
    import matplotlib
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate, no use on a page
    return text[text.index("<svg") :].strip()


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error over equal-width confidence bins (Guo et al. 2017): the bins' |accuracy
    - mean confidence|, weighted by their share of the images; plus the per-bin values for the plot."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds (edges[b], edges[b + 1]]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / np.maximum(count, 1)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    n = max(len(confidence), 1)
    gaps = np.abs(accuracy - mean_conf)
    return {
        "ece": float((count / n * gaps).sum()),
        "mce": float(gaps[count > 0].max()) if count.any() else 0.0,
        "edges": edges,
        "count": count,
        "accuracy": accuracy,
        "confidence": mean_conf,
    }


def reliability_svg(cal: dict, salt: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, count = cal["edges"], cal["count"]
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    used = count > 0
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 4.8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="#9aa5b1", label="perfectly calibrated")
    ax.bar(centers[used], cal["accuracy"][used], width=width, color="#3b82f6", edgecolor="white", label="accuracy")
    ax.bar(
        centers[used],
        cal["confidence"][used] - cal["accuracy"][used],
        bottom=cal["accuracy"][used],
        width=width,
        color="#ef4444",
        alpha=0.3,
        edgecolor="#ef4444",
        label="gap to confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {100 * cal['ece']:.2f}%)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.bar(centers, count, width=width, color="#9aa5b1", edgecolor="white")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    return svg_of(fig, salt)


# ---- page sections ---------------------------------------------------------------------------------


class Markup(str):
    """Text that is already HTML."""


def _table(
    headers: list[str], rows: list[list[str]], table_id: str = "", numeric: tuple[int, ...] = (), narrow: bool = False
) -> str:
    """A table from already-escaped cells; columns in ``numeric`` are right-aligned; ``narrow``: as wide as
    its content instead of the whole section."""
    classes = ["narrow"] if narrow else []
    if numeric and numeric == tuple(range(1, len(headers))):
        classes.append("rest-num")  # one class on the table instead of one per cell: 7,000-row tables stay small
        numeric = ()
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{h}</th>" for i, h in enumerate(headers))
    body = "\n".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    ident += f' class="{" ".join(classes)}"' if classes else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _kv_table(pairs: list[tuple[str, object]], table_id: str = "") -> str:
    rows = [[esc(k), v if isinstance(v, Markup) else esc(v)] for k, v in pairs if v not in (None, "")]
    ident = f' id="{table_id}"' if table_id else ""
    body = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"{ident}><tbody>\n{body}\n</tbody></table>'


def _code(text: object) -> Markup:
    return Markup(f"<code>{esc(text)}</code>")


def _count(value: object) -> str:
    return str(len(value)) if isinstance(value, (list, dict)) else esc(value if value is not None else 0)


def section_run_info(r: RunData, rid: str) -> str:
    from facecls.core.download import sha256_file

    info = r.info
    pre = info.get("preprocess", {})
    batch = info.get("batch", {})
    weights = info.get("weights", {})
    checkpoint = r.evaluation.get("checkpoint", "best")
    ckpt_path = r.path / f"{checkpoint}.ckpt" if checkpoint in ("best", "last") else Path(checkpoint)
    if checkpoint == "best" and not ckpt_path.is_file():
        ckpt_path = r.path / "last.ckpt"
    ckpt = (
        Markup(
            f"{_code(ckpt_path.name)} epoch {esc(r.evaluation.get('epoch', '?'))}, SHA-256 "
            f"{_code(sha256_file(ckpt_path))}"
        )
        if ckpt_path.is_file()
        else "not in the run folder"
    )
    if weights.get("path"):
        pretrained = Markup(
            f"{esc(weights.get('name'))}: {_code(weights['path'])}, SHA-256 {_code(weights.get('sha256', '?'))} "
            f"({esc(weights.get('loaded', '?'))} tensors loaded, {_count(weights.get('missing'))} missing, "
            f"{_count(weights.get('ignored'))} ignored)"
        )
    else:
        pretrained = weights.get("name", "-") + (" (random initialisation)" if weights.get("name") == "none" else "")
    env = info.get("environment", {})
    versions = ", ".join(f"{k} {env[k]}" for k in ("facecls", "python", "torch", "torchvision", "numpy") if env.get(k))
    speed = ", ".join(f"{k}={v}" for k, v in info.get("speed", {}).items())
    command = " ".join(str(a) for a in env.get("command", []))
    general = _kv_table(
        [
            ("recipe", info.get("recipe")),
            ("model", info.get("model")),
            ("identities", info.get("num_classes")),
            ("data folder", _code(r.data_dir)),
            (
                "input",
                f"{pre.get('input_size')} px (resized to {pre.get('resize')}), mean {pre.get('mean')}, "
                f"std {pre.get('std')}"
                if pre
                else None,
            ),
            (
                "batch",
                f"{batch.get('global')} = {batch.get('processes')} process(es) x {batch.get('per_process')} "
                f"x {batch.get('grad_accum')} accumulation"
                if batch
                else None,
            ),
            ("seeds", f"training {info['seed']}, split {info.get('split_seed')}" if "seed" in info else None),
            ("split manifest SHA-256", _code(info["manifest_sha256"]) if "manifest_sha256" in info else None),
            ("pretrained weights", pretrained),
            ("evaluated checkpoint", ckpt),
            ("speed settings", speed),
            ("versions", versions),
            ("platform", env.get("platform")),
            ("git revision", env.get("git_revision")),
            ("command", _code(command) if command else None),
        ],
        f"{rid}-info",
    )
    config = r.path / "config.yaml"
    recipe = (
        f"<details><summary>resolved recipe (config.yaml)</summary><pre>{esc(config.read_text(encoding='utf-8'))}"
        "</pre></details>"
        if config.is_file()
        else ""
    )
    return f'<section id="{rid}-run"><h3>Run</h3>{general}{recipe}</section>'


def section_curves(r: RunData, rid: str) -> str:
    if not r.metrics:
        return f'<section id="{rid}-curves"><h3>Training curves</h3><p class=muted>no metrics.csv</p></section>'
    fig = runs.curves_figure(r.metrics)
    cols = ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    rows = [[esc(m.get(c, "")) for c in cols] for m in r.metrics]
    table = _table(cols, rows, f"{rid}-metrics", numeric=(0, 2, 3, 4, 5, 6, 7))
    return (
        f'<section id="{rid}-curves"><h3>Training curves</h3><div class="chart">{svg_of(fig, rid + "-curves")}</div>'
        f"<details><summary>per-epoch numbers (metrics.csv)</summary>{table}</details></section>"
    )


def section_summary(r: RunData, rid: str, cal: dict) -> str:
    e = r.evaluation
    errors = sum(not p.correct for p in r.predictions)
    kpis = [
        ("top1", "top-1", pct(e.get("top1"))),
        ("top5", "top-5", pct(e.get("top5"))),
        ("loss", "loss", f"{e['loss']:.4f}" if "loss" in e else "-"),
        ("count", "images", f"{e.get('count', len(r.predictions)):,}"),
        ("errors", "misclassified", f"{errors:,}"),
        ("ece", "ECE", pct(cal["ece"])),
    ]
    cards = "".join(
        f'<div class="kpi"><span>{esc(label)}</span><b data-key="{key}">{esc(value)}</b></div>'
        for key, label, value in kpis
    )
    where = f"{esc(r.split)} split, {esc(e.get('checkpoint', 'best'))} checkpoint (epoch {esc(e.get('epoch', '?'))})"
    return (
        f'<section id="{rid}-summary"><h3>Results</h3><p class=muted>{where}</p>'
        f'<div class="kpis">{cards}</div></section>'
    )


def _identity_rows(per_class: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(per_class, key=lambda c: (float(c["accuracy"]), -int(c["count"]), c["identity"]))


def section_identities(r: RunData, rid: str, thumbs: Thumbnails) -> str:
    rows = _identity_rows(r.per_class)
    if not rows:
        return ""

    def cells(c: dict[str, str]) -> list[str]:
        return [esc(c["identity"]), esc(c["count"]), esc(c["correct"]), f"{100 * float(c['accuracy']):.2f}%"]

    def worst_cells(c: dict[str, str]) -> list[str]:
        name, count, correct, accuracy = cells(c)
        bar = f'<span class="bar"><i style="width:{100 * float(c["accuracy"]):.0f}%"></i></span>'
        return [name, count, correct, bar + accuracy, _example(r, c["identity"], thumbs, small=True)]

    headers = ["identity", "images", "correct", "accuracy"]
    worst = _table(
        [*headers, "example"], [worst_cells(c) for c in rows[:WORST_ROWS]], f"{rid}-worst", (1, 2, 3), narrow=True
    )
    perfect = sum(float(c["accuracy"]) == 1.0 for c in rows)
    text = (
        f"<p class=muted>{len(rows):,} identities in the {esc(r.split)} split, worst first; "
        f"{perfect:,} with every image right, {sum(float(c['accuracy']) == 0.0 for c in rows):,} with none.</p>"
    )
    full = ""
    if len(rows) > WORST_ROWS:
        full = (
            f"<details><summary>all {len(rows):,} identities</summary>"
            f'<input class="filter" type="search" placeholder="filter identities" data-table="{rid}-all">'
            + _table(headers, [cells(c) for c in rows], f"{rid}-all", (1, 2, 3), narrow=True)
            + "</details>"
        )
    return f'<section id="{rid}-identities"><h3>Per-identity accuracy</h3>{text}{worst}{full}</section>'


def section_confused(r: RunData, rid: str, thumbs: Thumbnails) -> str:
    directed = Counter((p.identity, p.predicted) for p in r.predictions if not p.correct)
    pairs: Counter = Counter()
    for (a, b), n in directed.items():
        pairs[tuple(sorted((a, b)))] += n
    if not pairs:
        return f'<section id="{rid}-confused"><h3>Most-confused pairs</h3><p class=muted>no errors</p></section>'
    totals = Counter(p.identity for p in r.predictions)
    cards = []
    for (a, b), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_PAIRS]:
        ab, ba = directed.get((a, b), 0), directed.get((b, a), 0)
        cards.append(
            f'<div class="pair"><div class="imgs">{_example(r, a, thumbs)}{_example(r, b, thumbs)}</div>'
            f'<div><b>{esc(a)}</b> &harr; <b>{esc(b)}</b>: <span class="n">{n}</span> error{"s" if n > 1 else ""}'
            f'<div class="muted small">{esc(a)} &rarr; {esc(b)}: {ab} of {totals[a]} images<br>'
            f"{esc(b)} &rarr; {esc(a)}: {ba} of {totals[b]} images</div></div></div>"
        )
    shown = min(len(pairs), MAX_PAIRS)
    return (
        f'<section id="{rid}-confused"><h3>Most-confused pairs</h3><p class=muted>{shown} of {len(pairs):,} '
        f"pairs with errors, most errors first (both directions counted); pictures: one training image of each "
        f'identity.</p><div class="pairs">{"".join(cards)}</div></section>'
    )


def _example(r: RunData, identity: str, thumbs: Thumbnails, small: bool = False) -> str:
    """A thumbnail of one image of ``identity`` (``small``: shown at half size in table rows)."""
    example = r.examples.get(identity)
    if example is None:
        return '<span class="noimg">no example</span>'
    return thumbs.img(r.data_dir / example, identity, f"{identity}: {example}", small)


def section_errors(r: RunData, rid: str, thumbs: Thumbnails, max_errors: int) -> str:
    errors = sorted((p for p in r.predictions if not p.correct), key=lambda p: (-p.score, p.path))
    if not errors:
        return f'<section id="{rid}-errors"><h3>Error gallery</h3><p class=muted>no errors</p></section>'
    cards = []
    for p in errors[:max_errors]:
        cards.append(
            '<div class="err"><div class="imgs">'
            f"<figure>{thumbs.img(r.data_dir / p.path, p.path, p.path)}<figcaption>image</figcaption></figure>"
            f"<figure>{_example(r, p.predicted, thumbs)}<figcaption>predicted</figcaption></figure>"
            f"<figure>{_example(r, p.identity, thumbs)}<figcaption>true</figcaption></figure></div>"
            f'<div class="path" title="{esc(p.path)}">{esc(p.path)}</div>'
            f'<div>predicted <b class="bad">{esc(p.predicted)}</b> {100 * p.score:.1f}%</div>'
            f"<div>true <b>{esc(p.identity)}</b> {100 * p.true_score:.1f}%</div></div>"
        )
    shown = min(len(errors), max_errors)
    return (
        f'<section id="{rid}-errors"><h3>Error gallery</h3><p class=muted>{shown:,} of {len(errors):,} '
        f"misclassified images, most confident mistakes first (--max-errors {max_errors}); beside each, a training "
        f'image of the predicted and of the true identity, with their probabilities.</p><div class="gallery">'
        f"{''.join(cards)}</div></section>"
    )


def section_calibration(r: RunData, rid: str, cal: dict) -> str:
    if not r.predictions:
        return ""
    acc = float(np.mean([p.correct for p in r.predictions]))
    conf = float(np.mean([p.score for p in r.predictions]))
    facts = _kv_table(
        [
            ("expected calibration error", pct(cal["ece"])),
            ("maximum calibration error", pct(cal["mce"])),
            ("mean confidence", pct(conf)),
            ("top-1 accuracy", pct(acc)),
            ("bins", f"{len(cal['count'])} equal-width bins of the top-1 probability"),
        ],
        f"{rid}-calibration",
    )
    return (
        f'<section id="{rid}-calibration-section"><h3>Calibration</h3><div class="split">'
        f'<div class="chart small">{reliability_svg(cal, rid + "-reliability")}</div><div>{facts}'
        "<p class=muted>A calibrated model's confidence equals its accuracy: bars on the diagonal. Bars below it "
        "mean over-confidence.</p></div></div></section>"
    )


def section_open_set(r: RunData, rid: str) -> str:
    """Shown only when the run records an open-set threshold (``open_set`` in eval_<split>.json or run.json)."""
    found = r.evaluation.get("open_set") or r.info.get("open_set")
    if not isinstance(found, dict):
        return ""
    pairs = [
        (k, f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else v)
        for k, v in found.items()
    ]
    table = _kv_table(pairs, f"{rid}-openset-table")
    return f'<section id="{rid}-openset"><h3>Open-set threshold</h3>{table}</section>'


def _reason_summary(items: list[tuple[str, str]], table_id: str) -> str:
    """(file, reason) pairs -> a table of reasons with counts and a few example files each."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for file, reason in items:
        by_reason[reason.split(":", 1)[0]].append(file)
    rows = [
        [
            esc(reason),
            str(len(files)),
            ", ".join(_code(f) for f in files[:EXAMPLES_PER_REASON])
            + (" ..." if len(files) > EXAMPLES_PER_REASON else ""),
        ]
        for reason, files in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]
    return _table(["reason", "files", "examples"], rows, table_id, numeric=(1,))


def section_data_reports(r: RunData, rid: str) -> str:
    from facecls.data.scan import PREPARE_REPORT, read_skipped

    parts = []
    skipped = read_skipped(r.path / "skipped_files.csv")
    if skipped:
        parts.append(
            f"<h4>Files left out of the run ({len(skipped):,}, skipped_files.csv)</h4>"
            + _reason_summary([(s.path, s.reason) for s in skipped], f"{rid}-skipped")
        )
    else:
        parts.append("<p>No file was left out of the run (skipped_files.csv is empty).</p>")
    candidates = [r.data_dir / PREPARE_REPORT] + [r.data_dir / sub / PREPARE_REPORT for sub in ("train", "val", "test")]
    kaggle = _read_json(r.path / "kaggle.json") or {}
    if kaggle.get("submission"):
        submission = Path(kaggle["submission"])
        candidates.append(submission.with_name(submission.stem + "_detect_report.csv"))
    for report in candidates:
        rows = read_csv(report) if report.is_file() else []
        if not rows:
            continue
        file_key = "file" if "file" in rows[0] else "image_name"
        statuses = Counter(row.get("status", "") for row in rows)
        counts = ", ".join(f"{esc(s)} {n:,}" for s, n in statuses.most_common())
        problems = [(row[file_key], row["status"]) for row in rows if row.get("status") not in ("aligned", "")]
        parts.append(
            f"<h4>{esc(report.name)}: {len(rows):,} images</h4><p>{_code(report)}: {counts}</p>"
            + (_reason_summary(problems, f"{rid}-{report.stem}") if problems else "")
        )
    return f'<section id="{rid}-data"><h3>Data: skipped files, face detection</h3>{"".join(parts)}</section>'


def section_comparison(run_dirs: list[Path]) -> str:
    from facecls.commands.compare import COLUMNS, best_index, collect_rows, row_cells

    rows = collect_rows(run_dirs)
    best = best_index(rows)
    cells = [[esc(c) for c in row_cells(row)] for row in rows]
    if best is not None:
        cells[best] = [f"<b>{c}</b>" for c in cells[best]]
    table = _table([esc(c) for c in COLUMNS], cells, "comparison", numeric=(1, 2, 3))
    return (
        '<section id="comparison"><h2>Comparison</h2><p class=muted>The table of <code>facecls compare</code>; '
        f"the best run in bold.</p>{table}</section>"
    )


# ---- the page ------------------------------------------------------------------------------------


PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
:root{--fg:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;--accent:#2563eb;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#111827;color:#f9fafb;padding:18px 32px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:4px 0 0;color:#9ca3af}
nav{max-width:1240px;margin:0 auto;padding:10px 32px 0;color:var(--muted)}
nav a{margin-right:12px}
nav b{display:inline-block;min-width:80px}
main{max-width:1240px;margin:0 auto;padding:4px 32px 48px}
a{color:var(--accent);text-decoration:none}
h2{font-size:18px;margin:28px 0 8px}
section h2{margin-top:0}
h3{font-size:15px;margin:0 0 10px}
h4{font-size:14px;margin:14px 0 6px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px 20px;margin:14px 0}
.muted{color:var(--muted);margin:0 0 10px}
.note{background:#fffbeb;border:1px solid #fcd34d;border-radius:6px;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:#f9fafb;font-weight:600;position:sticky;top:0}
td.num,th.num,table.rest-num td+td,table.rest-num th+th{
text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.narrow{width:auto;min-width:520px}
table.narrow td{vertical-align:middle}
table.narrow td,table.narrow th{padding:3px 14px}
table.kv th{width:210px;color:var(--muted);font-weight:500}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f9fafb;padding:10px;overflow:auto}
details{margin:8px 0}
summary{cursor:pointer;color:var(--accent)}
.kpis{display:flex;gap:12px;flex-wrap:wrap}
.kpi{flex:1 1 130px;border:1px solid var(--line);border-radius:8px;padding:8px 12px}
.kpi span{color:var(--muted);font-size:12px}
.kpi b{display:block;font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}
.chart svg{width:100%;height:auto}
.chart.small svg{max-width:460px}
.split{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.split>div{flex:1 1 360px}
.bar{display:inline-block;width:80px;height:8px;background:#e5e7eb;border-radius:4px;margin-right:8px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--accent)}
.imgs{display:flex;gap:4px}
.imgs img,.noimg{width:${thumb}px;height:${thumb}px;border-radius:4px;background:#e5e7eb;object-fit:cover}
img.small,.noimg.small{width:${half}px;height:${half}px;vertical-align:middle;border-radius:3px}
td img.small{display:block}
.noimg{display:inline-flex;align-items:center;justify-content:center;font-size:11px;color:var(--muted)}
figure{margin:0;text-align:center}
figcaption{font-size:11px;color:var(--muted)}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}
.pair{display:flex;gap:10px;align-items:center;border:1px solid var(--line);border-radius:6px;padding:8px}
.pair .n{font-weight:600}
.small{font-size:12px;margin:2px 0 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(236px,1fr));gap:10px}
.err{border:1px solid var(--line);border-radius:6px;padding:8px;font-size:13px}
.err .path{color:var(--muted);font-size:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;margin-top:4px}
.bad{color:var(--bad)}
input.filter{margin:6px 0;padding:4px 8px;border:1px solid var(--line);border-radius:4px;width:260px}
</style>
</head>
<body>
<header><h1>$title</h1><p>$subtitle</p></header>
<nav>$nav</nav>
<main>
$body
</main>
<script>
document.querySelectorAll("input.filter").forEach(function (box) {
  box.addEventListener("input", function () {
    var query = box.value.toLowerCase();
    var rows = document.getElementById(box.dataset.table).tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      rows[i].hidden = query !== "" && rows[i].cells[0].textContent.toLowerCase().indexOf(query) < 0;
    }
  });
});
</script>
</body>
</html>
"""
)


def run_section(r: RunData, rid: str, thumbs: Thumbnails, max_errors: int) -> str:
    cal = calibration([p.score for p in r.predictions], [p.correct for p in r.predictions])
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in r.notes)
    parts = [
        section_summary(r, rid, cal),
        section_run_info(r, rid),
        section_curves(r, rid),
        section_identities(r, rid, thumbs),
        section_confused(r, rid, thumbs),
        section_errors(r, rid, thumbs, max_errors),
        section_calibration(r, rid, cal),
        section_open_set(r, rid),
        section_data_reports(r, rid),
    ]
    return f'<h2 id="{rid}">{esc(r.path.name)} <span class="muted">{esc(r.path)}</span></h2>{notes}{"".join(parts)}'


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    bytes: int
    thumbnails: int
    unreadable_images: int


def write_report(
    run_dirs: list[Path],
    out: Path | None = None,
    *,
    split: str | None = None,
    max_errors: int = 200,
    console: Console | None = None,
) -> ReportSummary:
    """Write the HTML page for ``run_dirs`` to ``out`` (default: ``RUN/report.html`` for one run,
    ``report.html`` for several). ``split``: ``val`` or ``test`` (default: test when evaluated)."""
    console = console or Console()
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise FaceclsError("report needs at least one run folder")
    if max_errors < 0:
        raise FaceclsError(f"--max-errors must be >= 0, got {max_errors}")
    if split not in (None, "val", "test"):
        raise FaceclsError(f"--split must be val or test, got {split!r}")
    for run in run_dirs:
        RunFolder(run).require()
    out = Path(out) if out is not None else (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    data = [load_run_data(run, split, console) for run in run_dirs]
    thumbs = Thumbnails()
    body = []
    if len(run_dirs) > 1:
        body.append(section_comparison(run_dirs))
    for i, r in enumerate(data):
        body.append(run_section(r, f"r{i}", thumbs, max_errors))
    if thumbs.unreadable:
        body.insert(
            0,
            f'<p class="note">{len(thumbs.unreadable):,} images could not be read for thumbnails (first: '
            f"{esc(thumbs.unreadable[0])}).</p>",
        )
    sections = [("summary", "results"), ("run", "run"), ("curves", "curves"), ("identities", "identities")]
    sections += [("confused", "confused pairs"), ("errors", "errors"), ("calibration-section", "calibration")]
    sections += [("data", "data")]
    links = [
        f'<div><a href="#r{i}"><b>{esc(r.path.name)}</b></a> '
        + " ".join(f'<a href="#r{i}-{anchor}">{label}</a>' for anchor, label in sections)
        + "</div>"
        for i, r in enumerate(data)
    ]
    if len(run_dirs) > 1:
        links.insert(0, '<div><a href="#comparison"><b>comparison</b></a></div>')
    title = "facecls report: " + ", ".join(r.path.name for r in data)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = f"{len(data)} run(s); {', '.join(f'{r.path.name}: {r.split} split' for r in data)}; written {generated}"
    page = PAGE.substitute(
        title=esc(title),
        subtitle=esc(subtitle),
        nav="".join(links),
        body="\n".join(body),
        thumb=THUMB_PX,
        half=THUMB_PX // 2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text_atomic(out, page)
    size = out.stat().st_size
    console.log(f"report: {out} ({size / 1e6:.2f} MB, {thumbs.encoded} images)")
    return ReportSummary(out, size, thumbs.encoded, len(thumbs.unreadable))
