"""Open-set metrics and the verification protocol: pure numpy on similarity scores.

Convention everywhere: a score is a similarity (higher = more alike), and a pair or a probe is
*accepted* when ``score >= threshold``. Scores are compared in float64.

- ``roc_auc``: area under the ROC curve, rank-based (Mann-Whitney U, ties counted half).
- ``threshold_at_far`` / ``tar_at_far``: the lowest threshold whose false-accept rate on impostor
  scores is at most the target, and the genuine accept rate there.
- ``verification_folds``: the LFW protocol: for each fold, the threshold with the best accuracy on the
  other folds, applied to that fold; mean and (population) standard deviation of the fold accuracies.
- ``open_set_accuracy``: known probes identified correctly *and* accepted, plus unknown probes rejected.
- ``read_pairs``: a strict parser for LFW's pairs.txt and for a plain ``path1 path2 label`` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecls.core.errors import FaceclsError, list_for_error
from facecls.data.scan import IMAGE_EXTENSIONS


def _as_scores(scores, name: str = "scores") -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise FaceclsError(f"{name} hold NaN or infinite values")
    return array


def roc_auc(scores, same) -> float:
    """Area under the ROC curve of ``scores`` for the positives ``same`` (bool): the probability that a
    random positive scores above a random negative, ties counted as one half."""
    scores = _as_scores(scores)
    same = np.asarray(same, dtype=bool).reshape(-1)
    if scores.shape != same.shape:
        raise FaceclsError(f"{scores.size} scores but {same.size} labels")
    positives, negatives = int(same.sum()), int((~same).sum())
    if positives == 0 or negatives == 0:
        raise FaceclsError("ROC AUC needs both same-person and different-person pairs")
    # Average ranks (1-based) of tied values: the Mann-Whitney statistic with ties counted half.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    average_rank = upper - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[same].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def threshold_at_far(impostor_scores, far: float) -> float:
    """The lowest threshold at which at most ``far`` of the impostor scores are accepted (``>=``)."""
    if not 0.0 <= far <= 1.0:
        raise FaceclsError(f"the false-accept rate must be between 0 and 1, got {far}")
    impostors = np.sort(_as_scores(impostor_scores, "impostor scores"))[::-1]
    if impostors.size == 0:
        raise FaceclsError("a threshold for a false-accept rate needs impostor scores; there are none")
    allowed = int(np.floor(far * impostors.size + 1e-9))  # the 1e-9 keeps 0.01 * 300 = 3, not 2.9999
    if allowed >= impostors.size:
        return float(impostors[-1])
    # Just above the first impostor that must be rejected; tied impostors above it are rejected too.
    return float(np.nextafter(impostors[allowed], np.inf))


def tar_at_far(genuine_scores, impostor_scores, far: float) -> tuple[float, float]:
    """``(true-accept rate, threshold)`` at the threshold ``threshold_at_far(impostor_scores, far)``."""
    genuine = _as_scores(genuine_scores, "genuine scores")
    if genuine.size == 0:
        raise FaceclsError("TAR@FAR needs genuine scores; there are none")
    threshold = threshold_at_far(impostor_scores, far)
    return float(np.mean(genuine >= threshold)), threshold


def best_threshold(scores, same) -> float:
    """The threshold with the highest accuracy (accepted = same) on these pairs, taken midway between
    two distinct scores; of equally good ones the lowest, so the choice is deterministic."""
    scores = _as_scores(scores)
    same = np.asarray(same, dtype=bool).reshape(-1)
    values = np.unique(scores)
    # Candidates: below everything, then midway between consecutive distinct scores, then above everything.
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0]])
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    # For candidate t: correct = positives with score >= t + negatives with score < t.
    below = np.searchsorted(sorted_scores, candidates, side="left")
    negatives_below = np.concatenate([[0], np.cumsum(~sorted_same)])[below]
    positives_below = np.concatenate([[0], np.cumsum(sorted_same)])[below]
    correct = (sorted_same.sum() - positives_below) + negatives_below
    return float(candidates[int(np.argmax(correct))])


@dataclass(frozen=True)
class VerificationResult:
    """The LFW protocol's numbers: per-fold accuracy and threshold, their mean/std, and ROC AUC."""

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    auc: float
    pairs: int

    def as_dict(self) -> dict:
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "fold_accuracies": self.fold_accuracies,
            "fold_thresholds": self.fold_thresholds,
            "roc_auc": self.auc,
            "pairs": self.pairs,
        }


def verification_folds(scores, same, folds) -> VerificationResult:
    """Accuracy per fold with the threshold chosen on all the other folds (the LFW protocol)."""
    scores = _as_scores(scores)
    same = np.asarray(same, dtype=bool).reshape(-1)
    folds = np.asarray(folds).reshape(-1)
    if not scores.shape == same.shape == folds.shape:
        raise FaceclsError(f"{scores.size} scores, {same.size} labels and {folds.size} fold numbers")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise FaceclsError("the verification protocol needs at least 2 folds")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(float(np.mean((scores[test] >= threshold) == same[test])))
        thresholds.append(threshold)
    return VerificationResult(
        accuracy_mean=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        fold_accuracies=accuracies,
        fold_thresholds=thresholds,
        auc=roc_auc(scores, same),
        pairs=int(scores.size),
    )


def contiguous_folds(count: int, n_folds: int = 10) -> np.ndarray:
    """Fold numbers for ``count`` pairs in ``min(n_folds, count)`` contiguous, near-equal blocks."""
    n_folds = max(1, min(n_folds, count))
    return (np.arange(count) * n_folds) // max(count, 1)


@dataclass(frozen=True)
class OpenSetResult:
    """Open-set identification at one threshold."""

    accuracy: float
    """(known probes identified correctly and accepted + unknown probes rejected) / all probes"""
    known_identified: float
    """detection and identification rate: known probes identified correctly and accepted"""
    unknown_rejected: float
    """unknown probes rejected (1 - their false-accept rate)"""
    known: int
    unknown: int

    def as_dict(self) -> dict:
        return {
            "open_set_accuracy": self.accuracy,
            "known_identified": self.known_identified,
            "unknown_rejected": self.unknown_rejected,
            "known": self.known,
            "unknown": self.unknown,
        }


def open_set_accuracy(best_scores, predicted, labels, threshold: float) -> OpenSetResult:
    """``labels`` holds each probe's true class index, or -1 for an identity the gallery does not hold;
    ``predicted`` the class index of its best score ``best_scores``."""
    scores = _as_scores(best_scores)
    predicted = np.asarray(predicted).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not scores.shape == predicted.shape == labels.shape:
        raise FaceclsError(f"{scores.size} scores, {predicted.size} predictions and {labels.size} labels")
    if scores.size == 0:
        raise FaceclsError("open-set accuracy needs at least one probe")
    accepted = scores >= threshold
    known = labels >= 0
    identified = known & accepted & (predicted == labels)
    rejected = ~known & ~accepted
    n_known, n_unknown = int(known.sum()), int((~known).sum())
    return OpenSetResult(
        accuracy=float((identified.sum() + rejected.sum()) / scores.size),
        known_identified=float(identified.sum() / n_known) if n_known else float("nan"),
        unknown_rejected=float(rejected.sum() / n_unknown) if n_unknown else float("nan"),
        known=n_known,
        unknown=n_unknown,
    )


@dataclass(frozen=True)
class Pairs:
    """Image pairs to verify: paths relative to the images folder, same-person flags, fold numbers."""

    first: list[str]
    second: list[str]
    same: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    def images(self) -> list[str]:
        """Every image the pairs name, once each, sorted."""
        return sorted(set(self.first) | set(self.second))


def _int(text: str, path: Path, line_no: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise FaceclsError(f"{path}:{line_no}: {what} {text!r} is not a whole number") from None
    if value < 0:
        raise FaceclsError(f"{path}:{line_no}: {what} {value} is negative")
    return value


def _lfw_name(name: str, number: str, path: Path, line_no: int) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise FaceclsError(f"{path}:{line_no}: {name!r} is not an LFW identity name")
    return f"{name}/{name}_{_int(number, path, line_no, 'image number'):04d}"


def _fields(line: str) -> list[str]:
    """Tab-separated fields when the line has a tab (so paths may hold spaces), else whitespace-separated."""
    line = line.strip()
    if "\t" in line:
        return [field.strip() for field in line.split("\t") if field.strip()]
    return line.split()


def read_pairs(path: Path) -> Pairs:
    """Parse LFW's pairs.txt (or pairsDevTrain/Test.txt), or a plain file of ``path1 path2 label`` lines.

    LFW: a header ``FOLDS N`` (or just ``N`` for one fold), then per fold N same-person lines
    ``name n1 n2`` followed by N different-person lines ``name1 n1 name2 n2``; their images are
    ``<name>/<name>_<nnnn>`` with an image suffix (see ``resolve_pair_images``).
    Plain: each line ``path1 path2 label`` (label 1 = same person, 0 = different), paths relative to the
    images folder, separated by tabs (then paths may hold spaces) or by whitespace; blank lines and
    lines starting with ``#`` are ignored; split into 10 contiguous folds in file order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FaceclsError(f"pairs file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FaceclsError(f"cannot read pairs file {path}: {err}") from None
    lines = [(no, _fields(line)) for no, line in enumerate(text.splitlines(), 1)]
    content = [(no, fields) for no, fields in lines if fields and not fields[0].startswith("#")]
    if not content:
        raise FaceclsError(f"pairs file {path} holds no pairs")
    header_no, header = content[0]
    if all(field.isdigit() for field in header) and len(header) in (1, 2):
        return _read_lfw_pairs(path, header_no, header, content[1:])
    return _read_plain_pairs(path, content)


def _read_lfw_pairs(path: Path, header_no: int, header: list[str], body: list[tuple[int, list[str]]]) -> Pairs:
    n_folds, per_kind = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    if n_folds < 1 or per_kind < 1:
        raise FaceclsError(f"{path}:{header_no}: header {' '.join(header)!r} must give folds >= 1 and pairs >= 1")
    expected = n_folds * 2 * per_kind
    if len(body) != expected:
        raise FaceclsError(
            f"{path}: the header promises {n_folds} folds x {per_kind} same + {per_kind} different pairs "
            f"= {expected} lines, but the file has {len(body)}"
        )
    first, second, same, folds = [], [], [], []
    for index, (line_no, fields) in enumerate(body):
        fold, within = divmod(index, 2 * per_kind)
        if within < per_kind:
            if len(fields) != 3:
                raise FaceclsError(
                    f"{path}:{line_no}: expected a same-person pair 'name n1 n2' (pair {within + 1} of fold "
                    f"{fold + 1}), got {len(fields)} fields"
                )
            first.append(_lfw_name(fields[0], fields[1], path, line_no))
            second.append(_lfw_name(fields[0], fields[2], path, line_no))
            same.append(True)
        else:
            if len(fields) != 4:
                raise FaceclsError(
                    f"{path}:{line_no}: expected a different-person pair 'name1 n1 name2 n2' "
                    f"(fold {fold + 1}), got {len(fields)} fields"
                )
            first.append(_lfw_name(fields[0], fields[1], path, line_no))
            second.append(_lfw_name(fields[2], fields[3], path, line_no))
            same.append(False)
        folds.append(fold)
    if n_folds == 1:  # pairsDevTrain/Test: one block, split like a plain file so there is a protocol
        return Pairs(first, second, np.array(same), contiguous_folds(len(first)))
    return Pairs(first, second, np.array(same), np.array(folds))


def _read_plain_pairs(path: Path, content: list[tuple[int, list[str]]]) -> Pairs:
    first, second, same = [], [], []
    for line_no, fields in content:
        if len(fields) != 3:
            raise FaceclsError(
                f"{path}:{line_no}: expected 'path1 path2 label' (label 1 = same person, 0 = different) or an "
                f"LFW pairs.txt, got {len(fields)} fields"
            )
        if fields[2] not in ("0", "1"):
            raise FaceclsError(f"{path}:{line_no}: label {fields[2]!r} must be 1 (same person) or 0 (different)")
        for name in fields[:2]:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise FaceclsError(f"{path}:{line_no}: {name!r} must be a path inside the images folder")
        first.append(fields[0])
        second.append(fields[1])
        same.append(fields[2] == "1")
    if len(first) < 2:
        raise FaceclsError(f"pairs file {path} holds {len(first)} pair; the protocol needs at least 2")
    return Pairs(first, second, np.array(same), contiguous_folds(len(first)))


def resolve_pair_images(pairs: Pairs, images_dir: Path) -> dict[str, Path]:
    """The file of every image the pairs name, under ``images_dir``: the name itself when it exists,
    else the name plus an image suffix (LFW names carry none; ``facecls prepare`` keeps .jpg, adds .png).
    Raises one error listing the images not found."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FaceclsError(f"images folder {images_dir} does not exist")
    resolved, missing = {}, []
    suffixes = sorted(IMAGE_EXTENSIONS)
    for name in pairs.images():
        candidate = images_dir / name
        found = candidate if candidate.is_file() else None
        if found is None:
            found = next((p for s in suffixes if (p := images_dir / f"{name}{s}").is_file()), None)
        if found is None:
            missing.append(name)
        else:
            resolved[name] = found
    if missing:
        raise FaceclsError(
            f"{len(missing)} of {len(resolved) + len(missing)} images named in the pairs file are not in "
            f"{images_dir}: {list_for_error(missing)}"
        )
    return resolved


def identity_groups(labels, num_classes: int, n_groups: int = 5, seed: int = 0) -> np.ndarray:
    """For each class, the group (0..G-1) its identity is held out in, or -1 for classes with no probe in
    ``labels`` (those stay in the gallery in every round). Identities are shuffled with ``seed`` and dealt
    round-robin into ``min(n_groups, identities)`` groups."""
    present = np.unique(np.asarray(labels).reshape(-1))
    if present.size < 2:
        raise FaceclsError(
            f"holding identities out of the gallery needs probes of at least 2 identities, got {present.size}"
        )
    groups = min(n_groups, present.size)
    order = np.random.default_rng(seed).permutation(present)
    class_group = np.full(num_classes, -1, dtype=np.int64)
    class_group[order] = np.arange(order.size) % groups
    return class_group


def heldout_best(scores: np.ndarray, class_group: np.ndarray, softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best score and its class for each probe (rows of ``scores``, N x C) in each round g, where the
    classes of group g are taken out of the gallery: ``(best, predicted)``, both N x G. With ``softmax``
    the scores are logits and the best score is the top probability over the classes left; otherwise
    they are similarities (cosines) and the best is their maximum."""
    scores = np.asarray(scores, dtype=np.float64)
    n_groups = int(class_group.max()) + 1
    best = np.empty((scores.shape[0], n_groups))
    predicted = np.empty((scores.shape[0], n_groups), dtype=np.int64)
    for g in range(n_groups):
        masked = np.where(class_group[None, :] == g, -np.inf, scores)
        predicted[:, g] = masked.argmax(1)
        top = masked[np.arange(scores.shape[0]), predicted[:, g]]
        if softmax:  # max probability = 1 / sum(exp(logit - max logit)) over the classes left
            top = 1.0 / np.exp(masked - top[:, None]).sum(1)
        best[:, g] = top
    return best, predicted


@dataclass(frozen=True)
class HeldOutProbes:
    """Every (probe, round) of the held-out protocol, flattened: the best score and its class, and the
    probe's class or -1 when its identity was held out in that round (an unknown face)."""

    best: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_rounds(cls, best: np.ndarray, predicted: np.ndarray, labels, class_group: np.ndarray) -> HeldOutProbes:
        labels = np.asarray(labels).reshape(-1)
        rounds = np.arange(best.shape[1])[None, :]
        held_out = class_group[labels][:, None] == rounds
        open_labels = np.where(held_out, -1, labels[:, None])
        return cls(best.reshape(-1), predicted.reshape(-1), open_labels.reshape(-1))

    @property
    def impostor(self) -> np.ndarray:
        return self.best[self.labels < 0]

    @property
    def genuine(self) -> np.ndarray:
        return self.best[self.labels >= 0]


def open_set_report(probes: HeldOutProbes, threshold: float | None, fars=(0.01, 0.001)) -> dict:
    """TAR (known probes accepted) and the threshold at each FAR, and open-set accuracy at ``threshold``."""
    report: dict = {"probes_known": int((probes.labels >= 0).sum()), "probes_unknown": int((probes.labels < 0).sum())}
    for far in fars:
        tar, at = tar_at_far(probes.genuine, probes.impostor, far)
        report[f"tar@far={far:g}"] = tar
        report[f"threshold@far={far:g}"] = at
    if threshold is not None:
        result = open_set_accuracy(probes.best, probes.predicted, probes.labels, threshold)
        report.update({"threshold": threshold, **result.as_dict()})
        report["false_accept_rate"] = float(np.mean(probes.impostor >= threshold))
    return report
