from collections import Counter

from facecls.data.scan import Sample, find_labelled_images, list_flat_images
from facecls.data.split import manifest_bytes, read_manifest, stratified_split, write_manifest


def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(f"train/{ident}/{i:03d}.jpg", ident) for ident, n in counts.items() for i in range(n)]


def test_same_seed_same_files_gives_identical_manifest():
    samples = _samples({"a": 20, "b": 13, "c": 7})
    first = manifest_bytes(stratified_split(samples, (0.8, 0.1, 0.1), seed=3))
    second = manifest_bytes(stratified_split(list(reversed(samples)), (0.8, 0.1, 0.1), seed=3))
    assert first == second
    assert manifest_bytes(stratified_split(samples, (0.8, 0.1, 0.1), seed=4)) != first


def test_split_is_stratified_and_disjoint():
    counts = {"a": 20, "b": 10, "c": 3, "d": 2, "e": 1, "f": 57}
    rows = stratified_split(_samples(counts), (0.8, 0.1, 0.1), seed=0)
    assert len({r.path for r in rows}) == len(rows) == sum(counts.values())
    per = Counter((r.identity, r.split) for r in rows)
    for ident, n in counts.items():
        if n >= 3:
            assert per[(ident, "val")] >= 1 and per[(ident, "test")] >= 1 and per[(ident, "train")] >= 1
    assert per[("d", "train")] == 1 and per[("d", "val")] == 1
    assert per[("e", "train")] == 1
    assert per[("a", "train")] == 16 and per[("a", "val")] == 2 and per[("a", "test")] == 2
    assert per[("f", "val")] == 6 and per[("f", "test")] == 6


def test_fixed_val_folder_is_used_as_validation(tmp_path):
    for split, n in (("train", 10), ("val", 2)):
        for ident in ("x", "y"):
            folder = tmp_path / split / ident
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(b"")
    train, val, _ = find_labelled_images(tmp_path)
    rows = stratified_split(train, (0.8, 0.1, 0.1), seed=0, fixed_val=val)
    assert {r.path.split("/")[0] for r in rows if r.split == "val"} == {"val"}
    assert all(r.path.startswith("train/") for r in rows if r.split != "val")
    assert sum(r.split == "test" for r in rows) >= 2


def test_manifest_roundtrip(tmp_path):
    rows = stratified_split(_samples({"a": 5, "b b": 4, "ü": 3}), (0.8, 0.1, 0.1), seed=0)
    write_manifest(tmp_path / "split.csv", rows)
    assert read_manifest(tmp_path / "split.csv") == rows


def test_prepares_own_files_are_neither_data_nor_left_out(tmp_path):
    """`facecls prepare raw DATA/train` writes its report and settings beside the crops; a user's stray file is
    still listed."""
    (tmp_path / "train" / "alice").mkdir(parents=True)
    (tmp_path / "train" / "alice" / "1.png").write_bytes(b"")
    for folder in (tmp_path / "train", tmp_path / "train" / "alice"):
        (folder / "prepare_report.csv").write_text("file\n")
        (folder / "prepare_config.json").write_text("{}")
    (tmp_path / "train" / "notes.txt").write_text("x")
    train, _, skipped = find_labelled_images(tmp_path)
    assert [s.path for s in train] == ["train/alice/1.png"]
    # Only at the top of train/: inside an identity folder they are a user's files like any other.
    assert sorted(s.path for s in skipped) == [
        "train/alice/prepare_config.json",
        "train/alice/prepare_report.csv",
        "train/notes.txt",
    ]
    images, skipped = list_flat_images(tmp_path / "train" / "alice")
    assert [p.name for p in images] == ["1.png"] and skipped == []
