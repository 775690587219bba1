"""End to end on real faces (ORL): train -> evaluate -> predict -> score -> compare, via the CLI."""

import csv
import json
import shutil

import pytest

from facecls.cli import main

IDENTITIES = 20


@pytest.fixture(scope="module")
def orl_data(faces_data, tmp_path_factory):
    """ORL in the Kaggle layout: images 1-8 of each identity labelled, 9-10 in a flat test/ folder."""
    root = tmp_path_factory.mktemp("orl")
    solution = [("image_name", "label")]
    (root / "test").mkdir()
    for ident in sorted((faces_data / "orl").iterdir())[:IDENTITIES]:
        (root / "train" / ident.name).mkdir(parents=True)
        for image in sorted(ident.iterdir()):
            if image.stem in ("9", "10"):
                name = f"{ident.name}_{image.name}".replace("s", "img", 1)
                shutil.copy(image, root / "test" / name)
                solution.append((name, ident.name))
            else:
                shutil.copy(image, root / "train" / ident.name / image.name)
    with open(root / "solution.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(solution)
    return root


def test_train_evaluate_predict_score_compare(orl_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--recipe",
            "sface",
            "--data",
            str(orl_data),
            "--out",
            str(run),
            "--no-progress",
            "--set",
            "train.epochs=2",
            "--set",
            "train.frozen_epochs=2",
            "--set",
            "train.head_max_epochs=2",
            "--set",
            "optim.lr=0.01",
            "--set",
            "train.batch_size=32",
        ]
    )
    assert code == 0
    for name in (
        "best.ckpt",
        "last.ckpt",
        "split.csv",
        "metrics.csv",
        "curves.png",
        "config.yaml",
        "run.json",
        "classes.json",
        "eval_val.json",
        "eval_test.json",
        "skipped_files.csv",
    ):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as handle:
        # the recipe's logistic head is fitted on the stored features in one pass (one row)
        assert [(int(r["epoch"]), r["phase"]) for r in csv.DictReader(handle)] == [(1, "features")]
    with open(run / "split.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == IDENTITIES * 8
    assert {r["split"] for r in rows} == {"train", "val", "test"}

    assert main(["evaluate", str(run), "--split", "test"]) == 0
    result = json.loads((run / "eval_test.json").read_text())
    assert result["count"] == sum(r["split"] == "test" for r in rows)
    chance = 1 / IDENTITIES
    assert result["top1"] >= 5 * chance, result
    assert 0 <= result["top1"] <= result["top5"] <= 1
    with open(run / "per_class_test.csv") as handle:
        assert len(list(csv.DictReader(handle))) == IDENTITIES

    submission = tmp_path / "submission.csv"
    assert (
        main(["predict", str(run), "--images", str(orl_data / "test"), "--out", str(submission), "--no-progress"]) == 0
    )
    with open(submission) as handle:
        sub_rows = list(csv.reader(handle))
    assert sub_rows[0] == ["image_name", "label"]
    assert len(sub_rows) - 1 == 2 * IDENTITIES
    assert [r[0] for r in sub_rows[1:]] == sorted(r[0] for r in sub_rows[1:])

    # The compiled path (40 images in batches of 16: the last one eager) predicts what the eager one does.
    compiled = tmp_path / "compiled.csv"
    args = ["--out", str(compiled), "--compile", "--batch-size", "16", "--no-progress"]
    assert main(["predict", str(run), "--images", str(orl_data / "test"), *args]) == 0
    err = capsys.readouterr().err
    assert "compiling the model" in err and "torch.compile failed" not in err
    with open(compiled) as handle:
        compiled_rows = list(csv.reader(handle))
    same = sum(a == b for a, b in zip(compiled_rows[1:], sub_rows[1:], strict=True))
    assert same >= len(sub_rows) - 2  # bf16 rounding may flip a near-tie

    # So does the backbone through OpenVINO (chosen by hand: 40 images are below auto's threshold).
    through_openvino = tmp_path / "openvino.csv"
    args = ["--out", str(through_openvino), "--backend", "openvino", "--no-progress"]
    assert main(["predict", str(run), "--images", str(orl_data / "test"), *args]) == 0
    assert "the backbone runs through OpenVINO" in capsys.readouterr().err
    with open(through_openvino) as handle:
        openvino_rows = list(csv.reader(handle))
    same = sum(a == b for a, b in zip(openvino_rows[1:], sub_rows[1:], strict=True))
    assert same >= len(sub_rows) - 2

    capsys.readouterr()
    assert main(["score", str(submission), "--solution", str(orl_data / "solution.csv"), "--run", str(run)]) == 0
    accuracy = float(capsys.readouterr().out.split()[1].rstrip("%"))
    assert accuracy >= 100 * 5 * chance

    out = tmp_path / "table"
    assert main(["compare", str(run), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| Model | Validation Accuracy (%) | Test Accuracy (%) | Kaggle Score (%) |" in table
    assert f"{accuracy:.2f}" in table and "**SFace**" in table
    assert out.with_suffix(".csv").is_file() and out.with_suffix(".md").is_file()
