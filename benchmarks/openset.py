"""Open-set identification, enrolment and verification on real aligned faces (default: celeb24).

Half of the identities (seeded) are known: a `sface_ncm` run is trained on them (50/25/25 split). The
other half are people the run never saw. Measured, through the `facecls` command as a user runs it:

- ``predict --unknown auto --far F``: the threshold measured on validation, and on the known people's
  test faces plus every face of the never-seen people: the false-accept rate on the never-seen faces
  (target F) and the share of known faces identified correctly and accepted;
- ``enrol``: the never-seen people added with half of their images (seconds, of which embedding), then
  ``predict`` on their other half: top-1 accuracy on the newly enrolled people;
- ``verify --model sface``: 10 folds of seeded same/different pairs over all identities: accuracy
  (mean, std) and ROC AUC.

    python benchmarks/openset.py [--data ../shared/data/celeb24] [--far 0.01] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from facecls.cli import main as facecls
from facecls.runtime.machine import cpu_text


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    code = facecls([*args, "--no-progress"] if args[0] != "evaluate" else args)
    if code != 0:
        sys.exit(f"facecls {' '.join(args)} failed with exit code {code}")
    return time.perf_counter() - start


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _pairs(identities: dict[str, list[Path]], root: Path, per_fold: int, rng: random.Random) -> list[str]:
    names = sorted(identities)
    lines = []
    for _ in range(10):
        for _ in range(per_fold):
            name = rng.choice([n for n in names if len(identities[n]) >= 2])
            a, b = rng.sample(identities[name], 2)
            lines.append(f"{a.relative_to(root).as_posix()}\t{b.relative_to(root).as_posix()}\t1")
        for _ in range(per_fold):
            first, second = rng.sample(names, 2)
            a, b = rng.choice(identities[first]), rng.choice(identities[second])
            lines.append(f"{a.relative_to(root).as_posix()}\t{b.relative_to(root).as_posix()}\t0")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/celeb24"), help="<identity>/<image>")
    parser.add_argument("--far", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs-per-fold", type=int, default=150, help="same and different pairs per fold")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    identities = {d.name: _images(d) for d in sorted(args.data.iterdir()) if d.is_dir()}
    names = sorted(identities)
    rng.shuffle(names)
    known, unseen = sorted(names[: len(names) // 2]), sorted(names[len(names) // 2 :])
    work = args.work or Path(tempfile.mkdtemp(prefix="facecls-openset-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "data": str(args.data),
        "known_identities": len(known),
        "unseen_identities": len(unseen),
        "far_target": args.far,
        "cpu": cpu_text(),
    }
    try:
        data = work / "data"
        for name in known:
            shutil.copytree(args.data / name, data / "train" / name)
        run = work / "ncm"
        results["train_seconds"] = _run(
            ["train", "--recipe", "sface_ncm", "--data", str(data), "--out", str(run), "--set",
             "data.split=[0.5,0.25,0.25]"]
        )  # fmt: skip

        probes, truth = work / "probes", {}
        probes.mkdir()
        test_rows = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "test"]
        for row in test_rows:
            name = f"known__{Path(row['path']).name}"
            shutil.copy(data / row["path"], probes / name)
            truth[name] = row["identity"]
        enrol_dir, enrol_probes, enrol_truth = work / "new", work / "new_probes", {}
        enrol_probes.mkdir()
        for name in unseen:
            images = identities[name]
            for i, image in enumerate(images):
                shutil.copy(image, probes / f"{name}__{image.name}")
                truth[f"{name}__{image.name}"] = "unknown"
                if i < len(images) // 2:
                    (enrol_dir / name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(image, enrol_dir / name / image.name)
                else:
                    shutil.copy(image, enrol_probes / f"{name}__{image.name}")
                    enrol_truth[f"{name}__{image.name}"] = name
        submission = work / "unknown.csv"
        results["predict_unknown_seconds"] = _run(
            ["predict", str(run), "--images", str(probes), "--out", str(submission), "--unknown", "auto",
             "--far", str(args.far)]
        )  # fmt: skip
        record = json.loads((run / "openset.json").read_text())
        labels = {r["image_name"]: r["label"] for r in csv.DictReader(open(submission))}
        never_seen = [n for n, t in truth.items() if t == "unknown"]
        known_faces = [n for n, t in truth.items() if t != "unknown"]
        results.update(
            threshold=record["threshold"],
            val_impostors=record["probes_unknown"],
            far_unseen=sum(labels[n] != "unknown" for n in never_seen) / len(never_seen),
            unseen_faces=len(never_seen),
            known_identified=sum(labels[n] == truth[n] for n in known_faces) / len(known_faces),
            known_faces=len(known_faces),
        )

        enrolled = work / "enrolled"
        _run(["enrol", str(run), "--data", str(enrol_dir), "--out", str(enrolled)])
        enrol_record = json.loads((enrolled / "enrol.json").read_text())
        results["enrol_seconds"] = enrol_record["seconds_total"]
        results["enrol_embedding_seconds"] = enrol_record["seconds_embedding"]
        results["enrol_images"] = enrol_record["images"]
        enrolled_csv = work / "enrolled.csv"
        _run(["predict", str(enrolled), "--images", str(enrol_probes), "--out", str(enrolled_csv)])
        got = {r["image_name"]: r["label"] for r in csv.DictReader(open(enrolled_csv))}
        results["enrolled_top1"] = sum(got[n] == t for n, t in enrol_truth.items()) / len(enrol_truth)

        pairs = work / "pairs.txt"
        pairs.write_text("\n".join(_pairs(identities, args.data, args.pairs_per_fold, rng)) + "\n")
        verify_json = work / "verify.json"
        results["verify_seconds"] = _run(
            ["verify", "--model", "sface", "--pairs", str(pairs), "--images", str(args.data), "--out", str(verify_json)]
        )
        verify = json.loads(verify_json.read_text())
        results.update(
            verify_pairs=verify["pairs"],
            verify_accuracy=verify["accuracy_mean"],
            verify_std=verify["accuracy_std"],
            verify_auc=verify["roc_auc"],
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
