"""fetch_lfw on a tiny archive in LFW's layout, served from 127.0.0.1 with the pinned checksums patched."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import tarfile
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from facecls.commands import data as lfw
from facecls.core.errors import FaceclsError

IDENTITIES = {"Ada_Lovelace": 3, "Alan_Turing": 2, "Grace_Hopper": 1}
PAIRS = b"10\t300\nAda_Lovelace\t1\t2\n"


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 80, 160)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_archive(path: Path, extra: dict[str, bytes] | None = None) -> str:
    """Write a .tgz like lfw-funneled.tgz (plus `extra` members); return its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, count in IDENTITIES.items():
            for i in range(1, count + 1):
                _add(tar, f"lfw_funneled/{name}/{name}_{i:04d}.jpg", _jpeg(i))
        _add(tar, "lfw_funneled/README.txt", b"not an image")
        for name, data in (extra or {}).items():
            _add(tar, name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(monkeypatch: pytest.MonkeyPatch, key: str, sha256: str) -> None:
    monkeypatch.setitem(lfw.LFW_FILES, key, dataclasses.replace(lfw.LFW_FILES[key], sha256=sha256))


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_http_server) -> str:
    """Serve a tiny LFW (archive + pairs.txt) with matching pinned checksums; return the base URL."""
    root = tmp_path / "served"
    root.mkdir()
    _pin(monkeypatch, "funneled", _make_archive(root / "lfw-funneled.tgz"))
    (root / "pairs.txt").write_bytes(PAIRS)
    _pin(monkeypatch, "pairs", hashlib.sha256(PAIRS).hexdigest())
    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACECLS_OFFLINE", raising=False)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = local_http_server(functools.partial(Quiet, directory=str(root)))
    return f"http://127.0.0.1:{httpd.server_port}"


def _tree(train: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(train.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".lfw-" in p.name]


def test_fetch_extracts_layout_and_pairs(served: str, tmp_path: Path) -> None:
    out = tmp_path / "lfw"
    summary = lfw.fetch_lfw(out, base_url=served, progress=False)
    assert _tree(out / "train") == {
        "Ada_Lovelace": [f"Ada_Lovelace_000{i}.jpg" for i in (1, 2, 3)],
        "Alan_Turing": ["Alan_Turing_0001.jpg", "Alan_Turing_0002.jpg"],
        "Grace_Hopper": ["Grace_Hopper_0001.jpg"],
    }
    with Image.open(out / "train" / "Ada_Lovelace" / "Ada_Lovelace_0002.jpg") as image:
        assert image.size == (16, 16)
    assert (summary.identities, summary.images, summary.skipped_identities) == (3, 6, 0)
    assert summary.train_dir == out / "train"
    assert summary.pairs_path == out / "pairs.txt" and summary.pairs_path.read_bytes() == PAIRS
    recorded = json.loads((out / "lfw.json").read_text())
    assert recorded["images"] == 6 and recorded["archive_sha256"] == lfw.LFW_FILES["funneled"].sha256
    assert (tmp_path / "cache" / "lfw" / "lfw-funneled.tgz").is_file()
    assert _leftovers(tmp_path) == []


def test_min_images_filters_identities(served: str, tmp_path: Path) -> None:
    summary = lfw.fetch_lfw(tmp_path / "out", min_images=2, base_url=served, progress=False)
    assert sorted(_tree(tmp_path / "out" / "train")) == ["Ada_Lovelace", "Alan_Turing"]
    assert (summary.identities, summary.images) == (2, 5)
    assert (summary.skipped_identities, summary.skipped_images) == (1, 1)
    with pytest.raises(FaceclsError, match="most is 3"):
        lfw.fetch_lfw(tmp_path / "other", min_images=4, base_url=served, progress=False)
    assert not (tmp_path / "other" / "train").exists()


def test_wrong_checksum_leaves_out_dir_untouched(served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pin(monkeypatch, "funneled", "f" * 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FaceclsError, match="expected f{64}"):
        lfw.fetch_lfw(out, base_url=served, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "cache" / "lfw" / "lfw-funneled.tgz").exists()
    assert _leftovers(tmp_path) == []


def test_unsafe_member_is_refused(served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = tmp_path / "evil.tgz"
    _pin(monkeypatch, "funneled", _make_archive(evil, {"lfw_funneled/../../escaped.jpg": _jpeg(9)}))
    out = tmp_path / "a" / "out"
    with pytest.raises(FaceclsError, match="unsafe member"):
        lfw.fetch_lfw(out, archive=evil, base_url=served, progress=False)
    assert not (out / "train").exists() and not (tmp_path / "escaped.jpg").exists()
    assert _leftovers(tmp_path / "a") == []


def test_broken_archive_leaves_nothing(served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.tgz"
    _make_archive(good)
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _pin(monkeypatch, "funneled", hashlib.sha256(broken.read_bytes()).hexdigest())
    with pytest.raises(FaceclsError, match="broken"):
        lfw.fetch_lfw(tmp_path / "out", archive=broken, base_url=served, progress=False)
    assert not (tmp_path / "out" / "train").exists()
    assert _leftovers(tmp_path) == []


def test_user_archive_offline(served: str, tmp_path: Path) -> None:
    archive = tmp_path / "served" / "lfw-funneled.tgz"
    summary = lfw.fetch_lfw(tmp_path / "out", archive=archive, offline=True, progress=False)
    assert summary.images == 6 and summary.pairs_path is None  # pairs.txt not cached, offline: skipped
    with pytest.raises(FaceclsError, match="sha256"):
        lfw.fetch_lfw(tmp_path / "out2", archive=tmp_path / "served" / "pairs.txt", progress=False)


def test_offline_without_archive_says_what_to_download(served: str, tmp_path: Path) -> None:
    with pytest.raises(FaceclsError) as info:
        lfw.fetch_lfw(tmp_path / "out", offline=True, progress=False)
    message = str(info.value)
    remote = lfw.LFW_FILES["funneled"]
    assert remote.url in message and remote.sha256 in message and "--archive" in message
    assert str(tmp_path / "cache" / "lfw" / "lfw-funneled.tgz") in message


def test_rerun_same_dataset_is_kept_other_is_refused(served: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = lfw.fetch_lfw(out, min_images=2, base_url=served, progress=False)
    again = lfw.fetch_lfw(out, min_images=2, offline=True, progress=False)  # no download, no re-extract
    assert again == first
    with pytest.raises(FaceclsError, match="min-images 2"):
        lfw.fetch_lfw(out, min_images=1, base_url=served, progress=False)
    assert sorted(_tree(out / "train")) == ["Ada_Lovelace", "Alan_Turing"]
