"""A run's data: scan -> split manifest -> decode (cache) -> per-split datasets and loaders."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from facecls.config import AugmentConfig, DataConfig, Preprocess
from facecls.core.errors import FaceclsError
from facecls.data.datasets import EpochSampler, FaceImages, shard
from facecls.data.images import DecodedCache, UnreadableImage, check_decodes, die_with_parent, init_pool_worker
from facecls.data.scan import SkippedFile, find_labelled_images
from facecls.data.split import ManifestRow, class_names_from, read_manifest, stratified_split
from facecls.data.transforms import train_transform


class Processes(Protocol):
    """The processes that share a run (one outside torchrun): data shards by rank, and rank 0 alone
    builds the decoded cache while the others wait (facecls.runtime.distributed.DistEnv is one)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def broadcast(self, obj): ...


def make_manifest(
    root: Path, data: DataConfig, manifest: Path | None = None
) -> tuple[list[ManifestRow], list[SkippedFile]]:
    """The split: read from ``manifest`` when given, else a fresh seeded stratified split."""
    if manifest is not None:
        rows = read_manifest(manifest)
        missing = [r.path for r in rows if not (root / r.path).is_file()]
        if missing:
            raise FaceclsError(
                f"{len(missing)} files of manifest {manifest} are missing under {root} "
                f"(first: {missing[0]}); is it the same data folder?"
            )
        return rows, []
    train, val, skipped = find_labelled_images(root)
    return stratified_split(train, data.split, data.split_seed, fixed_val=val), skipped


def _check_one(path: str) -> str | None:
    try:
        check_decodes(path)
    except UnreadableImage as exc:
        return str(exc)
    return None


def find_unreadable(paths: list[Path], workers: int) -> dict[int, str]:
    """Decode every file once (no cache kept) and return {index: error} for the unreadable ones."""
    names = [str(p) for p in paths]
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=init_pool_worker) as pool:
            results = list(pool.map(_check_one, names, chunksize=64))
    else:
        results = [_check_one(n) for n in names]
    return {i: err for i, err in enumerate(results) if err is not None}


@dataclass
class SplitData:
    """Per-split datasets for a run, and the files that were left out (with reasons)."""

    class_names: list[str]
    datasets: dict[str, FaceImages] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)


def build_datasets(
    root: Path,
    rows: list[ManifestRow],
    preprocess: Preprocess,
    augment: AugmentConfig,
    *,
    use_cache: bool,
    cache_root: Path,
    workers: int,
    env: Processes,
    splits: tuple[str, ...] = ("train", "val", "test"),
    class_names: list[str] | None = None,
) -> SplitData:
    """Decode each split once (rank 0 builds the cache, the others wait and open it)."""
    class_names = class_names or class_names_from(rows)
    class_index = {name: i for i, name in enumerate(class_names)}
    out = SplitData(class_names)
    for split in splits:
        split_rows = [r for r in rows if r.split == split]
        if not split_rows:
            continue
        unknown = [r.identity for r in split_rows if r.identity not in class_index]
        if unknown:
            raise FaceclsError(f"identity '{unknown[0]}' in the {split} split is not one of the run's classes")
        paths = [root / r.path for r in split_rows]
        size = preprocess.resize if split == "train" else preprocess.input_size
        cache = None
        if use_cache:
            if env.is_main:
                cache = DecodedCache.build(cache_root, paths, size, workers=max(1, workers))
            env.barrier()
            if cache is None:
                cache = DecodedCache.build(cache_root, paths, size, workers=1)
            errors = cache.errors
        else:
            errors = find_unreadable(paths, max(1, workers)) if env.is_main else {}
            errors = env.broadcast(errors)
        keep = [i for i in range(len(split_rows)) if i not in errors]
        out.skipped += [SkippedFile(split_rows[i].path, f"unreadable image: {errors[i]}") for i in sorted(errors)]
        transform = train_transform(preprocess.input_size, augment) if split == "train" else None
        out.datasets[split] = FaceImages(
            [paths[i] for i in keep],
            [class_index[split_rows[i].identity] for i in keep],
            size,
            transform=transform,
            cache=cache,
            cache_rows=keep,
        )
    return out


def _init_worker(worker_id: int) -> None:
    """Set up a loader worker.

    Ctrl-C and SIGTERM (a scheduler's preemption notice, often sent to every process of the job) belong
    to the main process (training stops at a step boundary and saves); a worker that died of them would
    break the step that is finishing, so workers ignore both, and die with the main process instead
    (die_with_parent), so none is ever left behind parentless. And a worker hands its batches'
    shared memory to the main process through multiprocessing's resource sharer; when the main process is
    killed in the middle of that handshake, the sharer's thread reports the reset connection with a full
    traceback on the terminal the user killed the run from. The worker exits right after (its parent is
    gone) and nothing is lost, so that one report is dropped; every other one still goes to the hook."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    sys.excepthook = _quiet_when_the_receiver_died(sys.excepthook)


def _quiet_when_the_receiver_died(hook):
    def excepthook(kind, value, tb):
        outermost = tb.tb_frame.f_code.co_filename if tb is not None else ""
        if issubclass(kind, (ConnectionError, EOFError)) and Path(outermost).name == "resource_sharer.py":
            return
        hook(kind, value, tb)

    return excepthook


class _WorkerProcess(multiprocessing.get_context().Process):
    """A loader worker. It ignores SIGTERM (see _init_worker), so every ``terminate()`` of it sends SIGKILL
    instead: the loader's last resort for a worker that did not exit by itself, and multiprocessing's
    exit handler, which terminates daemonic workers through their Popen object and then joins them
    without a timeout (with SIGTERM ignored, a process that ends with live workers would never exit)."""

    @staticmethod
    def _Popen(process_obj):
        popen = multiprocessing.get_context().Process._Popen(process_obj)
        popen.terminate = popen.kill
        return popen


class _WorkerContext(type(multiprocessing.get_context())):
    Process = _WorkerProcess


def loader_kwargs(workers: int, pin_memory: bool, persistent: bool = True) -> dict:
    """DataLoader settings; with ``persistent`` the workers stay up between passes."""
    kwargs = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        kwargs.update(
            persistent_workers=persistent,
            prefetch_factor=4,
            worker_init_fn=_init_worker,
            multiprocessing_context=_WorkerContext(),
        )
    return kwargs


def stop_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now (a no-op without them).

    Left to the garbage collector, the loader's iterator is freed in one cycle with its queues (the loop
    and its callbacks refer to each other), and CPython runs the queues' weak-reference finalizers, which
    stop each queue's feeder thread, before the iterator's ``__del__``: the stop message then never leaves
    the main process, and torch waits 5 s for each worker before killing it (40 s at the end of every
    GPU run, with 8 workers). torch has no public call for this; ``_shutdown_workers`` is what its own
    ``__del__`` calls, and it runs once."""
    iterator = getattr(loader, "_iterator", None)  # set only with persistent workers
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


def train_loader(
    dataset: FaceImages, batch_size: int, seed: int, env: Processes, *, workers: int, pin_memory: bool
) -> DataLoader:
    """Shuffled, sharded, resumable (``loader.sampler.set_epoch(epoch, start)``) training batches."""
    if len(dataset) < env.world_size:
        raise FaceclsError(f"{len(dataset)} training images are too few for {env.world_size} processes")
    sampler = EpochSampler(list(range(len(dataset))), seed, env.rank, env.world_size, batch_size=batch_size)
    # A private generator: creating an iterator must not consume the global RNG (exact resume).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs(workers, pin_memory),
    )


def eval_loader(dataset, batch_size: int, env: Processes, *, workers: int, pin_memory: bool) -> DataLoader:
    """In-order batches of this process's shard (no padding, so nothing is counted twice)."""
    indices = shard(list(range(len(dataset))), env.rank, env.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices,
        generator=torch.Generator().manual_seed(0),
        **loader_kwargs(workers, pin_memory, persistent=False),
    )
