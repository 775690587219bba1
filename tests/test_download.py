"""download_file against a local HTTP server on 127.0.0.1 that supports Range requests."""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from facecls.core.download import (
    cache_dir,
    check_hash_prefix,
    download_file,
    hash_prefix_from_name,
    hub_checkpoints_dir,
    is_offline,
    sha256_file,
)
from facecls.core.errors import FaceclsError

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, not a multiple of the 1 MiB read size
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """How the test server answers; tests flip these."""

    ranges: bool = True  # honour Range with 206; False: ignore it and answer 200
    truncate: bool = False  # announce the full length, send half, close
    delay_s: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class _RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        behaviour: Behaviour = self.server.behaviour  # type: ignore[attr-defined]
        root: Path = self.server.root  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        behaviour.requests.append((self.path, range_header))
        time.sleep(behaviour.delay_s)
        path = root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if range_header and behaviour.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if behaviour.truncate else body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Server:
    url: str
    root: Path
    behaviour: Behaviour


@pytest.fixture
def server(tmp_path: Path, local_http_server) -> Server:
    root = tmp_path / "served"
    root.mkdir()
    (root / "blob.bin").write_bytes(PAYLOAD)
    httpd = local_http_server(_RangeHandler)
    httpd.root = root  # type: ignore[attr-defined]
    httpd.behaviour = Behaviour()  # type: ignore[attr-defined]
    return Server(f"http://127.0.0.1:{httpd.server_port}", root, httpd.behaviour)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACECLS_OFFLINE", raising=False)


def test_download_verifies_checksum(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "blob.bin"
    assert download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_suffix(".bin.part").exists()
    assert sha256_file(dest) == PAYLOAD_SHA


def test_existing_file_is_reused_without_network(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD)
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    download_file(f"{server.url}/blob.bin", dest, progress=False)
    assert server.behaviour.requests == []


def test_stale_file_is_replaced(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old version")
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    with pytest.raises(FaceclsError, match="expected 0{64}.*corrupt") as info:
        download_file(f"{server.url}/blob.bin", dest, "0" * 64, progress=False)
    assert PAYLOAD_SHA in str(info.value)
    assert not dest.exists()
    assert not dest.with_suffix(".bin.part").exists()


def test_resume_partial_download_with_range(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    half = len(PAYLOAD) // 2
    dest.with_suffix(".bin.part").write_bytes(PAYLOAD[:half])
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.behaviour.requests == [("/blob.bin", f"bytes={half}-")]


def test_restart_when_server_ignores_range(server: Server, tmp_path: Path) -> None:
    server.behaviour.ranges = False
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(b"x" * 1000)  # garbage: must be overwritten, not appended to
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_oversized_part_restarts_after_416(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(b"y" * (len(PAYLOAD) + 10))
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r for _, r in server.behaviour.requests] == [f"bytes={len(PAYLOAD) + 10}-", None]


def test_interrupted_download_keeps_part_and_resumes(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    server.behaviour.truncate = True
    with pytest.raises(FaceclsError, match="resumes"):
        download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    part = dest.with_suffix(".bin.part")
    assert part.stat().st_size == len(PAYLOAD) // 2
    assert not dest.exists()
    server.behaviour.truncate = False
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.behaviour.requests[-1] == ("/blob.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_complete_part_is_finished_without_network(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(PAYLOAD)
    download_file(f"{server.url}/blob.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.behaviour.requests == []


@pytest.mark.parametrize("how", ["argument", "env"])
def test_offline_missing_file_says_where_to_put_it(
    how: str, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "cache" / "blob.bin"
    url = f"{server.url}/blob.bin"
    if how == "env":
        monkeypatch.setenv("FACECLS_OFFLINE", "1")
    with pytest.raises(FaceclsError) as info:
        download_file(url, dest, PAYLOAD_SHA, offline=how == "argument", progress=False)
    message = str(info.value)
    assert url in message and str(dest) in message and PAYLOAD_SHA in message
    assert server.behaviour.requests == []


def test_offline_existing_file_is_used(tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(PAYLOAD)
    assert download_file("http://127.0.0.1:9/never", dest, PAYLOAD_SHA, offline=True) == dest


def test_connection_refused_is_a_user_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/blob.bin"
    dest = tmp_path / "blob.bin"
    with pytest.raises(FaceclsError) as info:
        download_file(url, dest, progress=False, timeout=5)
    message = str(info.value)
    assert url in message and str(dest) in message and "yourself" in message
    assert not dest.exists()


def test_http_404_and_timeout_are_user_errors(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FaceclsError, match="HTTP 404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "missing.bin", progress=False)
    server.behaviour.delay_s = 1.0
    with pytest.raises(FaceclsError, match="could not download"):
        download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=False, timeout=0.2)


def test_hash_prefix(server: Server, tmp_path: Path) -> None:
    name = f"blob-{PAYLOAD_SHA[:8]}.pth"
    (server.root / name).write_bytes(PAYLOAD)
    assert hash_prefix_from_name(name) == PAYLOAD_SHA[:8]
    assert hash_prefix_from_name("resnet50-0676ba61.pth") == "0676ba61"
    assert hash_prefix_from_name("weights.pth") is None
    dest = download_file(f"{server.url}/{name}", tmp_path / name, hash_prefix=PAYLOAD_SHA[:8], progress=False)
    assert check_hash_prefix(dest, PAYLOAD_SHA[:8]) == PAYLOAD_SHA
    with pytest.raises(FaceclsError, match="deadbeef"):
        check_hash_prefix(dest, "deadbeef")
    with pytest.raises(FaceclsError, match="starting with deadbeef"):
        download_file(f"{server.url}/{name}", tmp_path / "b.pth", hash_prefix="deadbeef", progress=False)
    assert not (tmp_path / "b.pth").exists()


def test_cache_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path / "fc"))
    assert cache_dir() == tmp_path / "fc"
    monkeypatch.delenv("FACECLS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "facecls"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert hub_checkpoints_dir() == tmp_path / "th" / "hub" / "checkpoints"


def test_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not is_offline()
    assert is_offline(True)
    monkeypatch.setenv("FACECLS_OFFLINE", "1")
    assert is_offline()
    monkeypatch.setenv("FACECLS_OFFLINE", "0")
    assert not is_offline()
