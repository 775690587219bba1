"""`facecls demo` wiring on a tiny synthetic set (the full demo is timed by hand, see README)."""

import csv

from facecls.commands.demo import run_demo
from facecls.data.synthetic import SyntheticSpec


def test_demo_runs_end_to_end_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACECLS_OFFLINE", "1")
    spec = SyntheticSpec(identities=4, images_per_identity=6, test_per_identity=2, size=48)
    table = run_demo(tmp_path / "demo", recipes=["mobilenet_v2"], spec=spec, progress=False)
    out, err = capsys.readouterr()
    assert "| MobileNetV2 |" in out.replace("**", "")
    assert "random initialisation" in err and "synthetic" in err
    assert table.is_file() and table.with_suffix(".csv").is_file()
    assert '<img src="data:image/jpeg;base64,' in (tmp_path / "demo" / "report.html").read_text()
    with open(tmp_path / "demo" / "submissions" / "mobilenet_v2.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_name", "label"] and len(rows) == 1 + 4 * 2
    with open(table.with_suffix(".csv")) as handle:
        row = next(csv.DictReader(handle))
    assert row["kaggle"] != "" and 0 <= float(row["kaggle"]) <= 100
    # a second run reuses the cached data set and replaces its own run folders
    run_demo(tmp_path / "demo", recipes=["mobilenet_v2"], spec=spec, progress=False)
