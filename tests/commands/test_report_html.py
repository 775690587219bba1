"""`facecls report` on a short real-face run (ORL): the page is self-contained, its numbers are the run's,
and it renders in headless Chromium without console errors or network requests."""

import base64
import csv
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecls.cli import main
from facecls.commands.compare import COLUMNS, collect_rows, row_cells
from facecls.commands.report import WORST_ROWS, calibration, write_report

ROOT = Path(__file__).resolve().parents[2]
IDENTITIES = 20


@pytest.fixture(scope="module")
def orl_run(faces_data, tmp_path_factory) -> Path:
    """MobileNetV2 from scratch at 64 px, two short epochs on 20 ORL identities: a real run with many errors.
    The data folder also holds a stray text file (a skipped file) and a prepare report."""
    root = tmp_path_factory.mktemp("orl_report")
    data = root / "data"
    for ident in sorted((faces_data / "orl").iterdir())[:IDENTITIES]:
        shutil.copytree(ident, data / "train" / ident.name)
    (data / "train" / "s1" / "notes.txt").write_text("not an image\n")
    with open(data / "prepare_report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "faces_found", "box", "score", "status", "output", "detail"])
        writer.writerow(["s1/1.pgm", "1", "1 2 3 4", "0.990", "aligned", "s1/1.pgm", ""])
        writer.writerow(["s2/1.pgm", "0", "", "", "no-face", "", ""])
    run = root / "run"
    code = main(
        [
            "train",
            "--recipe", "mobilenet_v2",
            "--data", str(data),
            "--out", str(run),
            "--no-progress",
            "--set", "model.weights=none",
            "--set", "data.input_size=64",
            "--set", "data.resize=72",
            "--set", "train.epochs=2",
            "--set", "train.frozen_epochs=0",
            "--set", "train.batch_size=16",
            "--set", "train.max_steps_per_epoch=3",
        ]
    )  # fmt: skip
    assert code == 0
    return run


@pytest.fixture(scope="module")
def report(orl_run) -> Path:
    return write_report([orl_run], orl_run / "report.html").path


class Page(HTMLParser):
    """The parts of the page the tests read: every <img>, tables by id (cell texts), elements with data-key."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.images: list[dict] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.keys: dict[str, str] = {}
        self.links: list[str] = []
        self._table: list[str] = []  # ids of the open tables (None for those without an id)
        self._cell: list[str] | None = None
        self._key: str | None = None
        self._row: list[str] | None = None
        self._in_head = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if name in a:
                self.links.append(a[name])
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table.append(a.get("id"))
            if a.get("id"):
                self.tables[a["id"]] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._table and self._table[-1] and not self._in_head:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        if "data-key" in a:
            self._key, self.keys[a["data-key"]] = a["data-key"], ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table[-1]].append(self._row)
            self._row = None
        elif tag == "table":
            self._table.pop()
        elif tag == "b":
            self._key = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._key is not None:
            self.keys[self._key] += data


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_page_is_self_contained_and_holds_the_runs_numbers(orl_run, report):
    text = report.read_text(encoding="utf-8")
    page = Page(text)
    # every image is an inlined JPEG that decodes; nothing else is linked but in-page anchors
    assert len(page.images) >= IDENTITIES
    for img in page.images:
        assert img["src"].startswith("data:image/jpeg;base64,"), img["src"][:80]
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    assert all(link.startswith(("data:", "#")) for link in page.links), [x[:60] for x in page.links]
    assert all(ref.startswith(("data:", "#")) for ref in re.findall(r"url\(\s*['\"]?([^)'\"]*)", text))
    assert "<link" not in text and "@import" not in text and "<iframe" not in text
    assert "<svg" in text  # curves and the reliability diagram are inline SVG

    evaluation = json.loads((orl_run / "eval_test.json").read_text())
    assert page.keys["top1"] == f"{100 * evaluation['top1']:.2f}%"
    assert page.keys["top5"] == f"{100 * evaluation['top5']:.2f}%"
    assert page.keys["loss"] == f"{evaluation['loss']:.4f}"
    assert page.keys["count"] == f"{evaluation['count']:,}"

    # per-image predictions agree with the evaluation summary
    predictions = read_csv(orl_run / "predictions_test.csv")
    assert len(predictions) == evaluation["count"]
    correct = np.array([p["correct"] == "1" for p in predictions])
    assert correct.mean() == pytest.approx(evaluation["top1"], abs=1e-12)
    in_top5 = [p["identity"] in [p[f"pred_{k}"] for k in range(1, 6)] for p in predictions]
    assert np.mean(in_top5) == pytest.approx(evaluation["top5"], abs=1e-12)
    assert all((p["pred_1"] == p["identity"]) == (p["correct"] == "1") for p in predictions)
    # -log(true_score) is each image's cross-entropy; rounding to 6 decimals bounds the difference
    losses = [-np.log(float(p["true_score"])) for p in predictions]
    assert np.mean(losses) == pytest.approx(evaluation["loss"], rel=1e-4)
    assert page.keys["errors"] == f"{int((~correct).sum()):,}"

    # ECE recomputed here, bin by bin, from the CSV's top-1 probabilities
    conf = np.array([float(p["score_1"]) for p in predictions])
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert page.keys["ece"] == f"{100 * ece:.2f}%"

    # per-identity table: the CSV's rows, worst first
    per_class = read_csv(orl_run / "per_class_test.csv")
    expected = sorted(per_class, key=lambda c: (float(c["accuracy"]), -int(c["count"]), c["identity"]))
    worst = page.tables["r0-worst"]
    assert len(worst) == min(WORST_ROWS, len(per_class))
    for row, c in zip(worst, expected, strict=False):
        assert row[:4] == [c["identity"], c["count"], c["correct"], f"{100 * float(c['accuracy']):.2f}%"]

    # per-epoch table: metrics.csv
    metrics = read_csv(orl_run / "metrics.csv")
    assert [r[0] for r in page.tables["r0-metrics"]] == [m["epoch"] for m in metrics]
    assert [r[2] for r in page.tables["r0-metrics"]] == [m["train_loss"] for m in metrics]

    # error gallery: every error (fewer than --max-errors here), three pictures each
    errors = int((~correct).sum())
    assert text.count('class="err"') == errors
    assert f"{errors:,} of {errors:,} misclassified images" in text

    # skipped files and the prepare report are summarised
    skipped = dict((r[0], r[1]) for r in page.tables["r0-skipped"])
    assert skipped["not an image extension (.txt)"] == "1"
    assert "train/s1/notes.txt" in text
    assert "prepare_report.csv: 2 images" in text
    assert page.tables["r0-prepare_report"] == [["no-face", "1", "s2/1.pgm"]]

    run_info = json.loads((orl_run / "run.json").read_text())
    info = dict((r[0], r[1]) for r in page.tables["r0-info"])
    assert info["identities"] == str(run_info["num_classes"]) == str(IDENTITIES)
    assert run_info["manifest_sha256"] in info["split manifest SHA-256"]
    assert "best.ckpt" in info["evaluated checkpoint"] and "SHA-256" in info["evaluated checkpoint"]
    assert "open-set" not in text.lower()  # this run has no threshold: no section


def test_report_command_compares_runs_and_evaluates_only_when_predictions_are_missing(orl_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(orl_run, other, ignore=shutil.ignore_patterns("report.html"))
    (other / "predictions_test.csv").unlink()
    out = tmp_path / "both.html"
    assert main(["report", str(orl_run), str(other), "--out", str(out), "--max-errors", "3"]) == 0
    err = capsys.readouterr().err
    assert f"{other} had no predictions_test.csv" in err
    assert (other / "predictions_test.csv").is_file()
    page = Page(out.read_text(encoding="utf-8"))
    # the comparison table has compare's columns and cells
    rows = collect_rows([orl_run, other])
    table = page.tables["comparison"]
    assert table == [row_cells(r) for r in rows]
    assert COLUMNS[1] in out.read_text()
    # each run's gallery is capped at --max-errors, and the run that was evaluated says so on the page
    assert out.read_text().count('class="err"') == 2 * min(3, int(page.keys["errors"]))
    assert "had no predictions_test.csv: evaluated its best checkpoint" in out.read_text()


def test_report_of_a_folder_that_is_no_run_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    expected = f"{tmp_path} is not a facecls run folder (no run.json); train one with `facecls train`"
    assert err == f"facecls: error: {expected}"


def test_calibration_error_of_known_bins():
    # two bins used: (0.8667, 0.9333] holds 0.9 x4 with 3 right; (0.4667, 0.5333] holds 0.5 x2 with 2 right
    cal = calibration([0.9, 0.9, 0.9, 0.9, 0.5, 0.5], [1, 1, 1, 0, 1, 1])
    assert cal["ece"] == pytest.approx(4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(1.0 - 0.5))
    assert cal["mce"] == pytest.approx(0.5)
    assert cal["count"].sum() == 6


def synthetic_run(workdir: Path, identities: int) -> Path:
    """The synthetic run folder of benchmarks/report_size.py (real faces, made-up predictions)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from report_size import make_synthetic_run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return make_synthetic_run(workdir, identities=identities)


def test_page_for_many_identities_stays_small(tmp_path):
    """At 600 identities the per-identity table is collapsed after the worst rows, images are capped by
    --max-errors, and the page is a few hundred KB."""
    run = synthetic_run(tmp_path / "synthetic", 600)
    summary = write_report([run], tmp_path / "big.html", max_errors=50)
    page = Page(summary.path.read_text(encoding="utf-8"))
    assert len(page.tables["r0-worst"]) == WORST_ROWS
    assert len(page.tables["r0-all"]) == 600
    assert page.keys["count"] == "1,200"
    assert len(page.images) <= WORST_ROWS + 2 * 20 + 3 * 50
    assert summary.bytes < 1_000_000


def test_open_set_section_only_with_a_threshold_and_missing_images_noted(tmp_path):
    run = synthetic_run(tmp_path / "synthetic", 30)
    evaluation = json.loads((run / "eval_test.json").read_text())
    plain = Page(write_report([run], tmp_path / "plain.html").path.read_text())
    assert "r0-openset-table" not in plain.tables
    evaluation["open_set"] = {"threshold": 0.4321, "far": 0.01, "open_set_accuracy": 0.875}
    (run / "eval_test.json").write_text(json.dumps(evaluation))
    shutil.rmtree(tmp_path / "synthetic" / "data")
    summary = write_report([run], tmp_path / "open.html")
    text = summary.path.read_text()
    page = Page(text)
    assert dict(page.tables["r0-openset-table"]) == {"threshold": "0.4321", "far": "0.01", "open_set_accuracy": "0.875"}
    # without the data folder the page still builds; it says why there are no pictures
    assert page.images == [] and summary.thumbnails == 0
    assert "not found here: the images are left out of this page" in text


# ---- headless Chromium through the DevTools protocol --------------------------------------------------


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail(
        "headless Chromium is needed to check the report page and was not found: install Debian's package "
        "(`apt-get install -y chromium`; .ci/run does this as root)"
    )


class DevTools:
    """Chromium with ``--remote-debugging-pipe``: DevTools protocol messages as NUL-terminated JSON on the
    child's fds 3 (commands in) and 4 (replies and events out). No port, no websocket, nothing to download."""

    def __init__(self, chromium: str, profile: Path):
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # the child's ends must not be fds 3 or 4 themselves, or one redirection below would clobber the other
        to_child, from_child = (self._above_4(fd) for fd in (to_child, from_child))
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # a tiny Python process moves the pipe ends to fds 3 and 4, then becomes Chromium (no preexec_fn:
        # forking a process with threads, such as torch's, must not run Python code in the child)
        move = "import os, sys; a = sys.argv; os.dup2(int(a[1]), 3); os.dup2(int(a[2]), 4); os.execv(a[3], a[3:])"
        command = [sys.executable, "-c", move, str(to_child), str(from_child), chromium, *flags]
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            command, pass_fds=(to_child, from_child), stdout=self._log, stderr=subprocess.STDOUT
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    @staticmethod
    def _above_4(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(fd)
        return moved

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next_id, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait(self, match, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if match(message):
                    return message
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._read, 1 << 20) if ready else b""
            if not chunk:
                raise AssertionError(f"Chromium stopped or did not answer in {timeout} s; its output:\n{self.output()}")
            self._buffer += chunk

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
            self.process.wait(timeout=10)
        except (AssertionError, RuntimeError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._write)
            os.close(self._read)
            self._log.close()


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``page`` from disk, wait for its load event, take a 1280 x 2000 screenshot; returns the console
    errors, uncaught exceptions, requests other than the page itself and inlined data, and whether every
    image decoded."""
    browser = DevTools(find_chromium(), profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        url = page.resolve().as_uri()
        browser.call("Page.navigate", {"url": url}, session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        images_ok = browser.call(
            "Runtime.evaluate",
            {"expression": "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"},
            session,
        )["result"]["value"]
        image_count = browser.call("Runtime.evaluate", {"expression": "document.images.length"}, session)["result"]
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        screenshot.write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    events = browser.events
    return {
        "console_errors": [
            e["params"] for e in events if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in
            ("error", "assert")
        ]
        + [e["params"]["entry"] for e in events if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"]
           == "error"],
        "exceptions": [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"],
        "requests": [
            e["params"]["request"]["url"]
            for e in events
            if e["method"] == "Network.requestWillBeSent"
            and e["params"]["request"]["url"] != url
            and not e["params"]["request"]["url"].startswith("data:")
        ],
        "images_ok": images_ok,
        "images": image_count["value"],
    }  # fmt: skip


def test_page_renders_in_headless_chromium_offline(report, tmp_path):
    screenshot = tmp_path / "report.png"
    seen = open_in_chromium(report, screenshot, tmp_path / "profile")
    assert seen["console_errors"] == []
    assert seen["exceptions"] == []
    assert seen["requests"] == [], "the page must need no network request"
    assert seen["images_ok"] and seen["images"] >= IDENTITIES
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    # the dark header band, the light page and the thumbnails give many distinct grey levels
    assert len(np.unique(pixels)) > 100


def test_chromium_check_sees_errors_and_requests(tmp_path):
    """The browser check itself: a page with a console error, an exception and a remote image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
        '<script>console.error("boom"); missing();</script></body></html>'
    )
    seen = open_in_chromium(bad, tmp_path / "bad.png", tmp_path / "profile")
    assert seen["requests"] == ["http://127.0.0.1:9/x.png"]
    assert any(e.get("args", [{}])[0].get("value") == "boom" for e in seen["console_errors"])
    assert seen["exceptions"]
