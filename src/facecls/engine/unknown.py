"""Unknown faces for a trained run: the score a prediction is judged by, and its threshold.

A prediction's score is the cosine similarity of the face to its class for embedding classifiers (to
the class vector of a nearest-mean, cosine, arcface or cosface head; to the class's most similar gallery
face for kNN), and the top softmax probability otherwise. A face scoring below the threshold is labelled ``unknown``.

The threshold is measured, not guessed (``--unknown auto``): on the run's validation split, the
validation identities are dealt into up to 5 groups, and in each round one group is taken out of the
gallery, so its images become faces of people the classifier has never seen (impostors) while the
others stay known. The threshold is the lowest one whose false-accept rate on those impostors is at
most the target (``--far``); it is written to ``RUN/openset.json`` with the measured TAR, and reused
while the checkpoint and the FAR stay the same. A trained head (linear, cosine, margin) has seen the
held-out identities as negatives during training, which pushes their scores down, so on never-seen
faces its false-accept rate comes out higher than measured; a nearest-mean gallery (and enrolled
identities) has no such bias.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facecls.core import runs
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.engine.openset import HeldOutProbes, heldout_best, identity_groups, open_set_report, threshold_at_far

OPENSET_FILE = "openset.json"
UNKNOWN_LABEL = "unknown"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The FaceClassifier inside compiled-inference, torch.compile and DDP wrappers."""
    model = getattr(model, "eager", model)
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _head(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(_unwrap(model), "head", None)


def _is_gallery(head: torch.nn.Module | None) -> bool:
    return isinstance(getattr(head, "gallery", None), torch.Tensor) and hasattr(head, "gallery_labels")


def cosine_scale(model: torch.nn.Module) -> float | None:
    """The scale s of a head whose logits are s * cos (cosine, arcface, cosface, nearest mean), else None."""
    head = _head(model)
    is_cosine = hasattr(head, "cosines") or isinstance(getattr(head, "means", None), torch.Tensor)
    if head is not None and is_cosine and hasattr(head, "scale"):
        return float(head.scale)
    return None


def score_kind(model: torch.nn.Module) -> str:
    """ "cosine" (to class vectors, or to the nearest gallery face of a kNN head) or "probability"."""
    return "cosine" if cosine_scale(model) is not None or _is_gallery(_head(model)) else "probability"


def _nearest_cosines(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """N x C: each face's cosine to the most similar gallery face of each class (-1 for a class without any)."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    similarity = (unit @ head.gallery.float().T).float()  # autocast computes the product in bf16
    out = torch.full((unit.shape[0], int(head.num_classes)), -1.0, device=unit.device)
    labels = head.gallery_labels.to(unit.device).unsqueeze(0).expand(unit.shape[0], -1)
    return out.scatter_reduce_(1, labels, similarity, reduce="amax")


def class_scores(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, scores)`` of a normalised batch, both N x C float32. The scores are what an unknown face
    is judged by: cosines to the class vectors, for a kNN head the cosine to each class's nearest gallery
    face, else the logits (whose softmax is the probability)."""
    head = _head(model)
    if _is_gallery(head):
        features = _unwrap(model).features(x)
        return head(features).float(), _nearest_cosines(head, features)
    logits = model(x).float()
    scale = cosine_scale(model)
    return logits, (logits / scale if scale is not None else logits)


def best_scores(
    model: torch.nn.Module, logits: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best score, predicted class)`` per row: the class is the classifier's, the score its score
    (a probability when the model is judged by probability)."""
    predicted = logits.argmax(1)
    if score_kind(model) == "probability":
        scores = torch.softmax(scores, dim=1)
    return scores.gather(1, predicted[:, None])[:, 0], predicted


@torch.inference_mode()
def heldout_probes(
    loaded, split: str, *, batch_size: int | None = None, console: Console | None = None
) -> HeldOutProbes:
    """The held-out protocol on ``split`` of a loaded run (see the module docstring). In each round a
    face's class is the best-scoring class left in the gallery (for kNN: its nearest gallery face's,
    which is the k-vote's class for all but borderline faces)."""
    from facecls.data.split import read_manifest
    from facecls.engine.inference import split_batches, split_dataset
    from facecls.runtime.distributed import DistEnv

    rows = read_manifest(Path(loaded.run) / "split.csv")
    if not any(r.split == split for r in rows):
        what = "a validation split" if split == "val" else f"a '{split}' split"
        raise FaceclsError(
            f"run {loaded.run} has no {what}, so no threshold for unknown faces can be measured on it; "
            "give one with --unknown VALUE, or train with a validation split"
        )
    env = DistEnv()
    data = split_dataset(loaded, rows, split, env)
    dataset = data.datasets[split]
    class_group = identity_groups(dataset.labels, len(loaded.class_names))
    softmax = score_kind(loaded.model) == "probability"
    loader, normalize, model = split_batches(loaded, dataset, env, batch_size or 128, console)
    model.eval()
    bests, predicted, labels = [], [], []
    bar = (console or Console(progress=False)).progress(f"unknown faces ({split})", len(dataset))
    for images, batch_labels, _ in loader:
        with loaded.runtime.autocast():
            _, scores = class_scores(model, normalize(images))
        best, pred = heldout_best(scores.cpu().numpy(), class_group, softmax)
        bests.append(best)
        predicted.append(pred)
        labels.append(batch_labels.numpy())
        bar.advance(len(batch_labels))
    bar.close()
    return HeldOutProbes.from_rounds(
        np.concatenate(bests), np.concatenate(predicted), np.concatenate(labels), class_group
    )


def _checkpoint_id(loaded) -> str:
    """What the threshold was measured for: the checkpoint file's SHA-256 (an enrolled gallery differs)."""
    from facecls.core.download import sha256_file

    return sha256_file(Path(loaded.checkpoint_path))


def read_openset(run: Path) -> dict | None:
    path = Path(run) / OPENSET_FILE
    if not path.is_file():
        return None
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise FaceclsError(f"{path} is not valid JSON; delete it and run with --unknown auto again") from None


def calibrate(loaded, far: float, *, console: Console | None = None, probes: HeldOutProbes | None = None) -> dict:
    """Measure the threshold for ``far`` on the validation split (``probes``: that split's, when already
    computed); write and return RUN/openset.json."""
    probes = probes if probes is not None else heldout_probes(loaded, "val", console=console)
    threshold = threshold_at_far(probes.impostor, far)
    record = {
        "threshold": threshold,
        "far": far,
        "score": score_kind(loaded.model),
        "split": "val",
        "checkpoint_sha256": _checkpoint_id(loaded),
        "class_count": len(loaded.class_names),
        **{k: v for k, v in open_set_report(probes, threshold).items() if k != "threshold"},
    }
    runs.write_json(Path(loaded.run) / OPENSET_FILE, record)
    return record


def parse_unknown(value: str) -> float | None:
    """``auto`` -> None (measure it); a number -> that threshold."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise FaceclsError(f"--unknown takes 'auto' or a number (a threshold on the score), got {value!r}") from None


def resolve_threshold(loaded, unknown: str, far: float, *, console: Console | None = None) -> float:
    """The threshold ``--unknown`` asks for: a given number, or the one measured for ``far`` (reused from
    RUN/openset.json when it was measured for this checkpoint and FAR, else measured now and written)."""
    if not 0.0 < far < 1.0:
        raise FaceclsError(f"--far must be between 0 and 1 (e.g. 0.01 for 1%), got {far}")
    value = parse_unknown(unknown)
    if value is not None:
        return value
    recorded = read_openset(loaded.run)
    if (
        recorded is not None
        and recorded.get("far") == far
        and recorded.get("checkpoint_sha256") == _checkpoint_id(loaded)
        and recorded.get("score") == score_kind(loaded.model)
    ):
        return float(recorded["threshold"])
    record = calibrate(loaded, far, console=console)
    if console is not None:
        console.log(
            f"unknown faces: threshold {record['threshold']:.4f} ({record['score']}) for FAR {far:g}, measured on "
            f"{record['probes_unknown']} held-out validation faces; written to {Path(loaded.run) / OPENSET_FILE}"
        )
    return float(record["threshold"])


def evaluate_open_set(loaded, split: str, *, batch_size: int | None = None, console: Console | None = None) -> dict:
    """Open-set numbers of ``split`` under the held-out protocol: TAR at FAR 1% and 0.1%, and the
    open-set accuracy at the run's recorded threshold (RUN/openset.json; measured on validation for
    FAR 1% when there is none yet; none at all for a run without a validation split)."""
    from facecls.data.split import read_manifest

    probes = heldout_probes(loaded, split, batch_size=batch_size, console=console)
    recorded = read_openset(loaded.run)
    if recorded is None and any(r.split == "val" for r in read_manifest(Path(loaded.run) / "split.csv")):
        recorded = calibrate(loaded, 0.01, console=console, probes=probes if split == "val" else None)
    report = open_set_report(probes, float(recorded["threshold"]) if recorded else None)
    return {"score": score_kind(loaded.model), "threshold_far": recorded["far"] if recorded else None, **report}


def wants_open_set(loaded) -> bool:
    """Evaluate reports open-set numbers for embedding classifiers, and for any run with a threshold."""
    return score_kind(loaded.model) == "cosine" or (Path(loaded.run) / OPENSET_FILE).is_file()
