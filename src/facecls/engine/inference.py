"""A trained run ready for inference, shared by the commands that use one (evaluate, predict, export, enrol,
embed) and by the engine's embedding and unknown-face code: loading it, one split of its data, the model as it
runs for inference, and in-order batches of images."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from facecls.config import Preprocess, Recipe
from facecls.core.checkpoint import load_checkpoint, load_model_state
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder
from facecls.data.pipeline import SplitData, build_datasets, eval_loader, loader_kwargs
from facecls.data.split import ManifestRow
from facecls.data.transforms import Normalize
from facecls.models.registry import FaceClassifier, create_model, default_flip_tta
from facecls.runtime.distributed import DistEnv
from facecls.runtime.openvino_backend import OpenVinoModule, use_openvino
from facecls.runtime.speed import CompiledInference, Runtime, fold_batchnorm, resolve_runtime, use_compiled_inference


@dataclass
class LoadedRun:
    """A trained run ready for inference."""

    run: Path
    recipe: Recipe
    info: dict
    class_names: list[str]
    preprocess: Preprocess
    model: FaceClassifier
    runtime: Runtime
    normalize: Normalize
    checkpoint: dict
    checkpoint_path: Path | None = None


def load_run(
    run: Path, checkpoint: str = "best", device: str | None = None, local_rank: int = 0, tta: bool | None = None
) -> LoadedRun:
    """Read a run folder and build its model from ``best.ckpt`` (or ``last``, or a file path). ``tta``:
    flip test-time augmentation on or off; None: the recipe's model.flip_tta (or the model's default)."""
    folder = RunFolder(run)
    run = folder.path
    folder.require()
    recipe = folder.read_recipe()
    info = folder.read_info()
    ckpt_path = folder.find_checkpoint(checkpoint)
    state = load_checkpoint(ckpt_path)
    class_names = folder.read_class_names()
    if list(state["class_names"]) != class_names:
        raise FaceclsError(f"checkpoint {ckpt_path} was trained on another class list than run {run}")
    if state.get("model_name", recipe.model.name) != recipe.model.name:
        raise FaceclsError(f"checkpoint {ckpt_path} holds a {state['model_name']}, the run is a {recipe.model.name}")
    preprocess = folder.read_preprocess()
    runtime = resolve_runtime(recipe.speed, device, local_rank)
    model = create_model(recipe.model.name, len(class_names), recipe.model.head)
    load_model_state(model, state["model"], ckpt_path)
    model.flip_tta = default_flip_tta(recipe.model) if tta is None else tta
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format).eval()
    normalize = Normalize(preprocess.mean, preprocess.std, runtime.channels_last).to(runtime.device)
    return LoadedRun(run, recipe, info, class_names, preprocess, model, runtime, normalize, state, ckpt_path)


def split_dataset(loaded: LoadedRun, rows: list[ManifestRow], split: str, env: DistEnv) -> SplitData:
    """The ``split`` images of ``rows`` (a run's split manifest) under the run's data folder, decoded for
    evaluation with the run's preprocessing and decoded-image cache (see build_datasets): ``.datasets`` holds
    the split (when it has rows), ``.skipped`` its unreadable files."""
    from facecls.core.download import cache_dir

    return build_datasets(
        Path(loaded.info.get("data_dir", "")),
        rows,
        loaded.preprocess,
        loaded.recipe.data.augment,
        use_cache=loaded.recipe.speed.decoded_cache,
        cache_root=cache_dir() / "decoded",
        workers=max(1, loaded.runtime.threads),
        env=env,
        splits=(split,),
        class_names=loaded.class_names,
    )


def split_batches(
    loaded: LoadedRun, dataset, env: DistEnv, batch_size: int, console: Console | None = None
) -> tuple[DataLoader, torch.nn.Module, torch.nn.Module]:
    """What evaluating ``loaded`` on ``dataset`` (a split of its data) iterates: ``(loader, normalize,
    model)``. A run whose backbone never trained reads the stored features (the backbone runs once per
    image, ever) and the model is its head; any other run reads the images through the whole model."""
    from facecls.engine.builder import backbone_never_trains
    from facecls.engine.features import stored_eval_loader

    if backbone_never_trains(loaded.recipe.train):
        return stored_eval_loader(
            loaded.model,
            dataset,
            preprocess=loaded.preprocess,
            runtime=loaded.runtime,
            model_name=loaded.recipe.model.name,
            env=env,
            batch_size=batch_size,
            seed=loaded.recipe.train.seed,
            console=console,
        )
    loader = eval_loader(dataset, batch_size, env, workers=loaded.runtime.workers, pin_memory=loaded.runtime.pin_memory)
    return loader, loaded.normalize, loaded.model


def inference_model(
    model: torch.nn.Module,
    runtime: Runtime,
    input_size: int,
    images: int = 0,
    batch_size: int = 128,
    console: Console | None = None,
) -> torch.nn.Module:
    """``model`` in eval mode, with BatchNorm folded into the convolutions when speed.fold_batchnorm is on,
    and compiled when speed.compile_inference says so for ``images`` images (see CompiledInference); or,
    when speed.inference_backend picks OpenVINO for them, with its backbone running there (a classifier's
    head stays in PyTorch)."""
    if use_openvino(runtime.inference_backend, runtime.device, images):
        try:
            return _through_openvino(model.eval(), runtime, input_size, console)
        except FaceclsError as exc:
            if runtime.inference_backend == "openvino":  # asked for by name: say so rather than fall back
                raise
            if console is not None:
                console.log(f"{exc}; running it in PyTorch")
    model = fold_batchnorm(model, input_size) if runtime.fold_batchnorm else model.eval()
    model = model.to(memory_format=torch.channels_last if runtime.channels_last else torch.contiguous_format)
    if use_compiled_inference(runtime, images):
        if console is not None:
            console.log("compiling the model for prediction (once; speed.compile_inference=false turns it off)")
        model = CompiledInference(model, batch_size)
    return model


def _through_openvino(model: torch.nn.Module, runtime: Runtime, input_size: int, console: Console | None):
    threads = torch.get_num_threads()
    if isinstance(model, FaceClassifier):
        backbone = OpenVinoModule(model.backbone, input_size, runtime.precision, threads)
        model = copy.copy(model)  # the caller's model keeps its own backbone
        model._modules = {**model._modules, "backbone": backbone}  # (a shallow copy shares this dict)
    else:
        model = OpenVinoModule(model, input_size, runtime.precision, threads)
    if console is not None:
        precision = "bf16" if runtime.precision == "bf16" else "fp32"
        console.log(f"the backbone runs through OpenVINO ({precision}; speed.inference_backend=torch for PyTorch)")
    return model


def predict_loader(
    dataset: Dataset,
    batch_size: int,
    runtime: Runtime,
    indices: list[int] | None = None,
    persistent: bool = False,
) -> DataLoader:
    """In-order batches of ``dataset`` (or of ``indices``), decoded in the runtime's worker processes;
    with ``persistent``, the workers stay up between passes over the loader."""
    sampler = indices if indices is not None else list(range(len(dataset)))
    kwargs = loader_kwargs(runtime.workers, runtime.pin_memory, persistent)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
