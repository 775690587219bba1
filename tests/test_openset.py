"""Open-set metrics and the pairs parser against hand-computed and brute-force values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facecls.core.errors import FaceclsError
from facecls.engine.openset import (
    best_threshold,
    open_set_accuracy,
    read_pairs,
    resolve_pair_images,
    roc_auc,
    tar_at_far,
    threshold_at_far,
    verification_folds,
)


def _auc_brute_force(scores: np.ndarray, same: np.ndarray) -> float:
    pos, neg = scores[same], scores[~same]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_roc_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=200).astype(np.float32)  # many ties
    same = rng.random(200) < 0.4
    assert roc_auc(scores, same) == pytest.approx(_auc_brute_force(scores, same), abs=1e-12)
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(FaceclsError, match="both"):
        roc_auc([0.1, 0.2], [True, True])


def test_threshold_at_far_bounds_false_accepts() -> None:
    impostors = np.arange(100, dtype=np.float64) / 100  # 0.00 .. 0.99
    t = threshold_at_far(impostors, 0.05)
    assert np.mean(impostors >= t) == 0.05 and t > 0.94 and t <= 0.95
    assert np.mean(impostors >= threshold_at_far(impostors, 0.0)) == 0.0
    assert threshold_at_far(impostors, 1.0) == 0.0
    # 3 of 300 at 1% even though 0.01 * 300 is 2.9999... in floating point
    many = np.linspace(0, 1, 300)
    assert np.sum(many >= threshold_at_far(many, 0.01)) == 3
    tar, threshold = tar_at_far([0.975, 0.98, 0.5, 0.99], impostors, 0.02)  # impostors 0.98, 0.99 pass
    assert tar == 0.75 and 0.97 < threshold <= 0.98
    with pytest.raises(FaceclsError):
        threshold_at_far(impostors, 1.5)


def test_best_threshold_and_folds_hand_computed() -> None:
    # Fold 0 pairs: same scores 0.9, 0.4; different 0.3, 0.6. Fold 1: same 0.8, 0.7; different 0.2, 0.5.
    scores = np.array([0.9, 0.4, 0.3, 0.6, 0.8, 0.7, 0.2, 0.5])
    same = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # Trained on fold 1 alone: every threshold in (0.5, 0.7) is perfect; the lowest midpoint is 0.6.
    assert best_threshold(scores[4:], same[4:]) == pytest.approx(0.6)
    # Trained on fold 0: 0.35 (3 of 4: 0.6 accepted) and 0.75 (3 of 4: 0.4 rejected) tie; lowest is 0.35.
    assert best_threshold(scores[:4], same[:4]) == pytest.approx(0.35)
    result = verification_folds(scores, same, folds)
    # Fold 0 at 0.6: 0.9 yes, 0.4 no (wrong), 0.3 no, 0.6 yes (wrong) -> 2/4. Fold 1 at 0.35: 0.8, 0.7 yes;
    # 0.2 no; 0.5 yes (wrong) -> 3/4.
    assert result.fold_accuracies == [0.5, 0.75]
    assert result.accuracy_mean == pytest.approx(0.625) and result.accuracy_std == pytest.approx(0.125)
    assert result.auc == pytest.approx(_auc_brute_force(scores, same))


def test_open_set_accuracy_counts_both_sides() -> None:
    scores = [0.9, 0.8, 0.2, 0.7, 0.1, 0.6]
    predicted = [0, 1, 1, 2, 0, 1]
    labels = [0, 0, 1, -1, -1, -1]  # known: right+accepted, wrong+accepted, right+rejected; unknown x3
    result = open_set_accuracy(scores, predicted, labels, threshold=0.65)
    assert result.known_identified == pytest.approx(1 / 3)
    assert result.unknown_rejected == pytest.approx(2 / 3)
    assert result.accuracy == pytest.approx(3 / 6)
    assert (result.known, result.unknown) == (3, 3)


LFW_PAIRS = """2\t2
Ada\t1\t2
Alan\t1\t3
Ada\t1\tAlan\t2
Grace\t1\tAda\t2
Grace\t1\t2
Alan\t2\t3
Alan\t1\tGrace\t2
Ada\t2\tGrace\t1
"""


def test_read_lfw_pairs(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(LFW_PAIRS)
    pairs = read_pairs(path)
    assert len(pairs) == 8
    assert pairs.first[0] == "Ada/Ada_0001" and pairs.second[0] == "Ada/Ada_0002"
    assert pairs.first[2] == "Ada/Ada_0001" and pairs.second[2] == "Alan/Alan_0002"
    assert pairs.same.tolist() == [True, True, False, False] * 2
    assert pairs.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("2\t2\nAda\t1\t2\n", "promises 2 folds"),
        ("1\t1\nAda\t1\tAlan\t2\nAda\t1\t2\n", "same-person pair"),
        ("1\t1\nAda\t1\t2\nAda\t1\t2\n", "different-person pair"),
        ("1\t1\nAda\tone\t2\nAda\t1\tB\t2\n", "not a whole number"),
        ("a.jpg b.jpg 2\nc.jpg d.jpg 1\n", "must be 1"),
        ("a.jpg b.jpg\n", "path1 path2 label"),
        ("../a.jpg b.jpg 1\nc.jpg d.jpg 0\n", "inside the images folder"),
        ("# nothing\n\n", "no pairs"),
    ],
)
def test_read_pairs_rejects_bad_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(FaceclsError, match=match):
        read_pairs(path)


def test_plain_pairs_and_missing_images(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "Ada").mkdir(parents=True)
    (images / "Ada" / "Ada_0001.jpg").write_bytes(b"x")
    (images / "b.png").write_bytes(b"x")
    path = tmp_path / "pairs.txt"
    path.write_text("# mine\nAda/Ada_0001.jpg b.png 1\nb.png Ada/Ada_0001.jpg 0\n")
    pairs = read_pairs(path)
    assert pairs.same.tolist() == [True, False] and pairs.folds.tolist() == [0, 1]
    path.write_text("Ada Lovelace/1.jpg\tAlan Turing/2.jpg\t0\nAda Lovelace/1.jpg\tAda Lovelace/3.jpg\t1\n")
    assert read_pairs(path).first == ["Ada Lovelace/1.jpg"] * 2  # tab-separated: names with spaces
    resolved = resolve_pair_images(pairs, images)
    assert resolved == {"Ada/Ada_0001.jpg": images / "Ada/Ada_0001.jpg", "b.png": images / "b.png"}
    lfw = tmp_path / "lfw.txt"
    lfw.write_text("1\nAda\t1\t2\nAda\t1\tZed\t1\n")
    with pytest.raises(FaceclsError, match="2 of 3 images .* Ada/Ada_0002, Zed/Zed_0001"):
        resolve_pair_images(read_pairs(lfw), images)
