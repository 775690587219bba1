"""embed, verify, enrol and predict --unknown on real faces (five celebrities, aligned by prepare; SFace)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facecls.cli import main

KNOWN = ["ben_afflek", "elton_john", "jerry_seinfeld"]
NEW = ["madonna", "mindy_kaling"]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".jpg")


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("facecls: error: "), err
    return err[0]


def _train(data: Path, run: Path, recipe: str, *settings: str) -> Path:
    args = ["train", "--recipe", recipe, "--data", str(data), "--out", str(run), "--no-progress"]
    for setting in ("data.split=[0.5,0.5,0.0]", *settings):
        args += ["--set", setting]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def known_data(five_celebrity_aligned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("known")
    for name in KNOWN:
        shutil.copytree(five_celebrity_aligned / name, root / "train" / name)
    return root


@pytest.fixture(scope="module")
def ncm_run(known_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sface_ncm recipe (class means of SFace embeddings) on three identities, half of each person's
    images held for validation."""
    return _train(known_data, tmp_path_factory.mktemp("ncm") / "run", "sface_ncm")


def test_embed_writes_one_row_per_readable_image(five_celebrity_aligned: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    for name in NEW:
        shutil.copytree(five_celebrity_aligned / name, images / name)
    (images / "madonna" / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "notes.txt").write_text("not an image")
    readable = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg") if p.name != "broken.jpg")
    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", "sface", "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    vectors = np.load(out)
    names = (tmp_path / "emb.names.txt").read_text().splitlines()
    assert names == readable and vectors.shape == (len(readable), 128) and vectors.dtype == np.float32
    # Unit vectors: float32 normalisation of 128 terms is exact to a few ulp (~1e-7 each).
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "emb.unreadable.txt").read_text().splitlines() == ["madonna/broken.jpg"]
    err = capsys.readouterr().err
    assert "madonna/broken.jpg" in err and "notes.txt" in err
    # Two images of one person are closer than images of two people, on average.
    ids = np.array([n.split("/")[0] for n in names])
    sims = vectors @ vectors.T
    same = ids[:, None] == ids[None, :]
    assert sims[same & ~np.eye(len(ids), dtype=bool)].mean() > sims[~same].mean() + 0.2

    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table_out = tmp_path / "emb.parquet"
    assert main(["embed", "--model", "sface", "--images", str(images), "--out", str(table_out), "--no-progress"]) == 0
    table = pq.read_table(table_out)
    assert table.column("path").to_pylist() == readable
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist(), np.float32), vectors, atol=1e-6)


def _lfw_layout(five_celebrity_aligned: Path, root: Path) -> Path:
    """Three identities in LFW's naming (<Name>/<Name>_0001.jpg), four images each."""
    for name in KNOWN:
        (root / name).mkdir(parents=True)
        for i, image in enumerate(_images(five_celebrity_aligned / name)[:4], 1):
            shutil.copy(image, root / name / f"{name}_{i:04d}.jpg")
    return root


LFW_PAIRS = """2\t3
ben_afflek\t1\t2
elton_john\t1\t3
jerry_seinfeld\t2\t4
ben_afflek\t1\telton_john\t1
elton_john\t2\tjerry_seinfeld\t2
jerry_seinfeld\t3\tben_afflek\t3
ben_afflek\t3\t4
elton_john\t2\t4
jerry_seinfeld\t1\t3
ben_afflek\t2\tjerry_seinfeld\t1
elton_john\t3\tben_afflek\t4
jerry_seinfeld\t4\telton_john\t4
"""


def _hand_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> list[float]:
    """The LFW protocol written out: per fold, try every threshold between the other folds' scores."""
    accuracies = []
    for fold in np.unique(folds):
        train_s, train_y = scores[folds != fold], same[folds != fold]
        ordered = np.sort(np.unique(train_s))
        candidates = (
            [ordered[0] - 1] + [(a + b) / 2 for a, b in zip(ordered[:-1], ordered[1:], strict=True)] + [ordered[-1] + 1]
        )
        best = max(candidates, key=lambda t: (np.mean((train_s >= t) == train_y), -t))
        test_s, test_y = scores[folds == fold], same[folds == fold]
        accuracies.append(float(np.mean((test_s >= best) == test_y)))
    return accuracies


def test_verify_matches_hand_computed_protocol(five_celebrity_aligned: Path, tmp_path: Path) -> None:
    images = _lfw_layout(five_celebrity_aligned, tmp_path / "lfw")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(LFW_PAIRS)
    result = tmp_path / "verify.json"
    args = ["verify", "--model", "sface", "--pairs", str(pairs), "--images", str(images), "--no-progress"]
    assert main([*args, "--out", str(result)]) == 0
    reported = json.loads(result.read_text())

    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", "sface", "--images", str(images), "--out", str(out), "--no-progress"]) == 0
    row = {n: i for i, n in enumerate((tmp_path / "emb.names.txt").read_text().splitlines())}
    vectors = np.load(out).astype(np.float64)
    lines = [line.split("\t") for line in LFW_PAIRS.splitlines()[1:]]
    scores, same = [], []
    for fields in lines:
        a, b = (
            (f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.jpg", f"{fields[0]}/{fields[0]}_{int(fields[2]):04d}.jpg")
            if len(fields) == 3
            else (
                f"{fields[0]}/{fields[0]}_{int(fields[1]):04d}.jpg",
                f"{fields[2]}/{fields[2]}_{int(fields[3]):04d}.jpg",
            )
        )
        scores.append(vectors[row[a]] @ vectors[row[b]])
        same.append(len(fields) == 3)
    scores, same = np.array(scores), np.array(same)
    folds = np.repeat([0, 1], 6)
    expected = _hand_accuracy(scores, same, folds)
    assert reported["fold_accuracies"] == expected
    assert reported["accuracy_mean"] == pytest.approx(np.mean(expected))
    assert reported["accuracy_std"] == pytest.approx(np.std(expected))
    pos, neg = scores[same], scores[~same]
    auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert reported["roc_auc"] == pytest.approx(auc)
    assert reported["pairs"] == 12 and reported["accuracy_mean"] >= 0.5


def test_verify_refuses_pairs_naming_missing_images(five_celebrity_aligned: Path, tmp_path: Path, capsys) -> None:
    images = _lfw_layout(five_celebrity_aligned, tmp_path / "lfw")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(LFW_PAIRS.replace("ben_afflek\t3\t4", "ben_afflek\t3\t9"))
    args = ["verify", "--model", "sface", "--pairs", str(pairs), "--images", str(images), "--no-progress"]
    assert main(args) == 2
    assert "ben_afflek/ben_afflek_0009" in _error_line(capsys)


def _split_new_people(source: Path, new_dir: Path, probes: Path) -> dict[str, str]:
    """The NEW people's first 10 images of ``source`` to enrol (``new_dir/<identity>/``), the rest as flat
    probes; returns probe file name -> identity."""
    probes.mkdir()
    truth = {}
    for name in NEW:
        images = _images(source / name)
        (new_dir / name).mkdir(parents=True)
        for image in images[:10]:
            shutil.copy(image, new_dir / name / image.name)
        for image in images[10:]:
            shutil.copy(image, probes / f"{name}__{image.name}")
            truth[f"{name}__{image.name}"] = name
    return truth


def test_enrol_adds_identities_and_leaves_source_untouched(
    ncm_run: Path, five_celebrity_aligned: Path, tmp_path: Path, capsys
) -> None:
    before = _tree_hashes(ncm_run)
    new_dir, probes = tmp_path / "new", tmp_path / "probes"
    truth = _split_new_people(five_celebrity_aligned, new_dir, probes)
    for image in _images(five_celebrity_aligned / "ben_afflek")[:6]:
        shutil.copy(image, probes / f"ben__{image.name}")
        truth[f"ben__{image.name}"] = "ben_afflek"
    enrolled = tmp_path / "enrolled"
    assert main(["enrol", str(ncm_run), "--data", str(new_dir), "--out", str(enrolled), "--no-progress"]) == 0
    assert _tree_hashes(ncm_run) == before
    record = json.loads((enrolled / "enrol.json").read_text())
    assert record["added"] == {"madonna": 10, "mindy_kaling": 10} and record["classes"] == 5
    classes = json.loads((enrolled / "classes.json").read_text())["class_names"]
    assert classes == [*KNOWN, *NEW]  # appended: the trained classes keep their indices

    submission = tmp_path / "sub.csv"
    args = ["predict", str(enrolled), "--images", str(probes), "--out", str(submission), "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(submission)))
    correct = sum(r["label"] == truth[r["image_name"]] for r in rows)
    assert len(rows) == len(truth) and correct >= 0.9 * len(rows), rows
    assert main(["evaluate", str(enrolled)]) == 0  # the source's validation split, on the bigger gallery
    assert main(["compare", str(ncm_run), str(enrolled), "--out", str(tmp_path / "cmp")]) == 0


def test_enrol_refuses_a_folder_without_images(ncm_run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "new" / "someone").mkdir(parents=True)
    (tmp_path / "new" / "someone" / "notes.txt").write_text("no faces here")
    args = ["enrol", str(ncm_run), "--data", str(tmp_path / "new"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "no images" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unknown_auto_needs_a_validation_split(ncm_run: Path, five_celebrity_aligned: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ncm_run, run)
    split = (run / "split.csv").read_text()
    (run / "split.csv").write_text(split.replace(",val\n", ",train\n"))
    (run / "openset.json").unlink(missing_ok=True)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_images(five_celebrity_aligned / "madonna")[0], images / "a.jpg")
    args = ["predict", str(run), "--images", str(images), "--out", str(tmp_path / "s.csv"), "--unknown", "auto"]
    assert main([*args, "--no-progress"]) == 2
    assert "validation split" in _error_line(capsys)


def test_raw_photos_with_detect(ncm_run: Path, five_celebrity_aligned: Path, faces_data: Path, tmp_path: Path):
    """--detect on the raw photos: embed gives the embeddings of prepare's aligned crops (up to the crops'
    JPEG re-encoding), and enrol + predict work on raw photos as on aligned ones."""
    raw = faces_data / "five_celebrity"
    out = tmp_path / "raw.npy"
    args = ["embed", "--model", "sface", "--images", str(raw / "madonna"), "--out", str(out), "--no-progress"]
    assert main([*args, "--detect"]) == 0
    assert (
        main(
            [
                "embed",
                "--model",
                "sface",
                "--images",
                str(five_celebrity_aligned / "madonna"),
                "--out",
                str(tmp_path / "aligned.npy"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "raw.names.txt").read_text() == (tmp_path / "aligned.names.txt").read_text()
    cosines = np.einsum("ij,ij->i", np.load(out), np.load(tmp_path / "aligned.npy"))
    assert cosines.mean() > 0.97, cosines

    new_dir, probes = tmp_path / "new", tmp_path / "probes"
    truth = _split_new_people(raw, new_dir, probes)
    enrolled = tmp_path / "enrolled"
    args = ["enrol", str(ncm_run), "--data", str(new_dir), "--out", str(enrolled), "--detect", "--no-progress"]
    assert main(args) == 0
    submission = tmp_path / "sub.csv"
    args = ["predict", str(enrolled), "--images", str(probes), "--out", str(submission), "--detect", "--no-progress"]
    # Class means of one person's faces: the same person's other faces score >= 0.4 (cosine, SFace).
    assert main([*args, "--unknown", "0.3"]) == 0
    rows = list(csv.DictReader(open(submission)))
    assert sum(r["label"] == truth[r["image_name"]] for r in rows) >= 0.9 * len(rows), rows


def test_unknown_auto_rejects_unseen_people_and_keeps_known(
    ncm_run: Path, five_celebrity_aligned: Path, tmp_path: Path
) -> None:
    from facecls.data.split import read_manifest

    run = tmp_path / "run"
    shutil.copytree(ncm_run, run)
    probes = tmp_path / "probes"
    probes.mkdir()
    truth = {}
    for row in read_manifest(run / "split.csv"):  # the known identities' validation faces
        if row.split == "val":
            name = f"known__{Path(row.path).name}"
            shutil.copy(five_celebrity_aligned / row.identity / Path(row.path).name, probes / name)
            truth[name] = row.identity
    for person in NEW:  # two people the run has never seen
        for image in _images(five_celebrity_aligned / person):
            shutil.copy(image, probes / f"{person}__{image.name}")
            truth[f"{person}__{image.name}"] = "unknown"
    submission = tmp_path / "sub.csv"
    far = 0.05
    args = ["predict", str(run), "--images", str(probes), "--out", str(submission), "--no-progress"]
    assert main([*args, "--unknown", "auto", "--far", str(far)]) == 0
    record = json.loads((run / "openset.json").read_text())
    assert record["far"] == far and record["score"] == "cosine" and record["false_accept_rate"] <= far
    labels = {r["image_name"]: r["label"] for r in csv.DictReader(open(submission))}
    unseen = [n for n, t in truth.items() if t == "unknown"]
    known = [n for n, t in truth.items() if t != "unknown"]
    accepted = sum(labels[n] != "unknown" for n in unseen) / len(unseen)
    kept = sum(labels[n] == truth[n] for n in known) / len(known)
    print(f"threshold {record['threshold']:.4f}: unseen accepted {accepted:.3f}, known identified {kept:.3f}")
    # ~41 unseen faces: a measured FAR of 5% may come out up to a few faces higher on them.
    assert accepted <= far + 0.1, accepted
    assert kept >= 0.8

    assert main(["evaluate", str(run)]) == 0
    open_set = json.loads((run / "eval_val.json").read_text())["open_set"]
    assert open_set["threshold"] == record["threshold"] and 0 <= open_set["tar@far=0.01"] <= 1
    assert {"open_set_accuracy", "known_identified", "unknown_rejected", "tar@far=0.001"} <= set(open_set)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "settings"),
    [("sface_knn", ()), ("sface", ("model.head.kind=cosine", "train.epochs=1", "train.frozen_epochs=1"))],
)
def test_enrol_into_knn_gallery_and_cosine_head(
    known_data: Path, five_celebrity_aligned: Path, tmp_path: Path, recipe: str, settings: tuple[str, ...]
) -> None:
    import torch

    run = _train(known_data, tmp_path / "run", recipe, *settings)
    new_dir, probes = tmp_path / "new", tmp_path / "probes"
    probes.mkdir()
    madonna = _images(five_celebrity_aligned / "madonna")
    (new_dir / "madonna").mkdir(parents=True)
    for image in madonna[:10]:
        shutil.copy(image, new_dir / "madonna" / image.name)
    for image in madonna[10:]:
        shutil.copy(image, probes / image.name)
    shutil.copytree(five_celebrity_aligned / "ben_afflek", new_dir / "ben_afflek")  # more of a known person
    if recipe == "sface_knn":  # before enrolment madonna is unknown: judged by her nearest gallery face
        unseen = tmp_path / "unseen.csv"
        args = ["predict", str(run), "--images", str(probes), "--out", str(unseen), "--unknown", "auto"]
        assert main([*args, "--far", "0.05", "--no-progress"]) == 0
        labels = [r["label"] for r in csv.DictReader(open(unseen))]
        assert labels.count("unknown") >= 0.75 * len(labels), labels
    enrolled = tmp_path / "enrolled"
    assert main(["enrol", str(run), "--data", str(new_dir), "--out", str(enrolled), "--no-progress"]) == 0
    record = json.loads((enrolled / "enrol.json").read_text())
    assert record["added"] == {"madonna": 10} and record["extended"] == {"ben_afflek": 14}
    before = torch.load(run / "best.ckpt", weights_only=True)["model"]
    after = torch.load(enrolled / "best.ckpt", weights_only=True)["model"]
    if recipe == "sface_knn":  # every enrolled image is a new gallery row
        assert after["head.gallery"].shape[0] == before["head.gallery"].shape[0] + 24
        assert (after["head.gallery_labels"][-24:] == 3).sum() == 10
    else:
        assert after["head.weight"].shape[0] == 4
        torch.testing.assert_close(after["head.weight"][1:3], before["head.weight"][1:3])  # not enrolled
    submission = tmp_path / "sub.csv"
    args = ["predict", str(enrolled), "--images", str(probes), "--out", str(submission), "--no-progress"]
    assert main(args) == 0
    labels = [r["label"] for r in csv.DictReader(open(submission))]
    assert labels.count("madonna") >= 0.9 * len(labels), labels
