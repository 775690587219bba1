"""Shared fixtures: the real faces that ship with the tests (tests/faces_data, see its README), aligned
crops made from them once per session, and a local HTTP server on 127.0.0.1 for the download code (the
tests never touch the internet).

Disk: the suite writes checkpoints of real models (ResNet-50's are 295 MB each), 6.4 GB in all if every
temporary folder were kept to the end. A passed test's folder goes at its teardown (pyproject:
``tmp_path_retention_policy``); a module's shared folders go when the module ends, unless one of its
tests failed (a failure keeps everything for a look). The peak stays near the largest module's use."""

import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

FACES_DATA = Path(__file__).resolve().parent / "faces_data"


_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Remove the folders this module's fixtures made (``tmp_path_factory.mktemp``) once the module is done,
    but those of session fixtures (named ``session_*``: later modules use them). Autouse and module-scoped,
    so it is set up before and torn down after the module's own fixtures."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _FAILED_MODULES:
        return
    for path in set(base.iterdir()) - before:
        if path.name.startswith("session_"):
            continue
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def faces_data() -> Path:
    """``orl/``, ``yale/`` and ``five_celebrity/``, each ``<identity>/<image>`` (read-only: copy to change)."""
    return FACES_DATA


@pytest.fixture(scope="session")
def five_celebrity_aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five-celebrity photos detected and aligned to 112 x 112 by ``facecls prepare`` (YuNet), as
    ``<identity>/<image>``: real in-the-wild faces in the layout the face-pretrained recipes expect."""
    from facecls.commands.prepare import prepare_folder

    out = tmp_path_factory.mktemp("session_five_celebrity") / "aligned"
    prepare_folder(FACES_DATA / "five_celebrity", out, size=112, progress=False)
    return out


@pytest.fixture
def build_sface(tmp_path: Path, faces_data: Path, monkeypatch: pytest.MonkeyPatch) -> Callable:
    """``build(overrides, fine_tune=True)``: ``(setup, runtime)`` of the sface recipe as ``facecls train``
    builds it (engine/builder.build_training), on three ORL identities at 32 px; ``fine_tune`` trains the
    whole backbone (the recipe as it is fits a head on stored features and never trains it)."""
    from facecls.config import load_recipe
    from facecls.engine.builder import build_training
    from facecls.runtime.speed import resolve_runtime

    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path / "cache"))
    for i in (1, 2, 3):
        shutil.copytree(faces_data / "orl" / f"s{i}", tmp_path / "data" / "train" / f"s{i}")
    base = ["data.input_size=32", "data.resize=32", "train.batch_size=4", "speed.workers=0"]
    fine_tune_overrides = ["model.head.kind=linear", "train.unfreeze=all", "train.epochs=2"]

    def build(overrides: list[str], fine_tune: bool = True):
        recipe = load_recipe("sface", [*base, *(fine_tune_overrides if fine_tune else []), *overrides])
        runtime = resolve_runtime(recipe.speed, "cpu")
        return build_training(recipe, tmp_path / "data", runtime, offline=True), runtime

    return build


@pytest.fixture
def local_http_server() -> Iterator[Callable[..., ThreadingHTTPServer]]:
    """``start(handler)`` serves ``handler`` on 127.0.0.1 (a free port: ``server_port``) in a thread;
    every server started is shut down at teardown, and a watchdog bounds it even if teardown never runs."""
    started: list[tuple[ThreadingHTTPServer, threading.Thread, threading.Timer]] = []

    def start(handler: Callable[..., BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        watchdog = threading.Timer(60, httpd.shutdown)
        watchdog.daemon = True
        watchdog.start()
        started.append((httpd, thread, watchdog))
        return httpd

    yield start
    for httpd, thread, watchdog in started:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
