import subprocess
import sys

import pytest

from facecls.config import load_recipe, recipe_from_dict, recipe_to_dict
from facecls.core.errors import FaceclsError
from facecls.models.registry import get_weight_spec
from facecls.recipes import bundled_recipes

RECIPES = bundled_recipes()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_parses_and_names_known_weights(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.model.weights != "none", "every seed recipe starts from named pretrained weights"
    get_weight_spec(recipe.model.name, recipe.model.weights)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_seed_settings_are_exact():
    r = load_recipe("resnet50")
    assert (r.optim.name, r.optim.lr, r.optim.betas) == ("adam", 1e-3, (0.9, 0.999))
    assert (r.train.epochs, r.train.frozen_epochs, r.train.batch_size) == (17, 3, 64)
    assert r.train.label_smoothing == 0.1 and r.model.head.dropout == 0.5 and r.scheduler.name == "plateau"
    m = load_recipe("mobilenet_v2")
    assert (m.optim.name, m.optim.lr, m.optim.weight_decay) == ("adamw", 5e-4, 1e-4)
    assert (m.train.epochs, m.train.frozen_epochs, m.scheduler.patience) == (10, 2, 2)
    i = load_recipe("inception_resnet_v1")
    assert (i.optim.lr, i.optim.finetune_lr, i.model.weights) == (1e-3, 5e-4, "vggface2")
    assert (i.train.epochs, i.train.frozen_epochs, i.train.unfreeze, i.train.unfreeze_last_n) == (
        10,
        3,
        "last_params",
        15,
    )
    assert i.train.label_smoothing == 0.1 and i.scheduler.patience == 2


def test_overrides_and_strictness(tmp_path):
    r = load_recipe("resnet50", ["train.epochs=5", "optim.lr=0.01", "data.augment.rotation=0"])
    assert r.train.epochs == 5 and r.optim.lr == 0.01 and r.data.augment.rotation == 0
    # YAML 1.1 reads "1e-3" as a string; a number field takes it as the number the user meant.
    assert load_recipe("resnet50", ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(FaceclsError, match="optim.lr: expected a number"):
        load_recipe("resnet50", ["optim.lr=fast"])
    with pytest.raises(FaceclsError, match="unknown key 'train.epoch'"):
        load_recipe("resnet50", ["train.epoch=2"])
    with pytest.raises(FaceclsError, match="train.epochs: expected an integer"):
        load_recipe("resnet50", ["train.epochs=two"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: resnet50, wieghts: none}\n")
    with pytest.raises(FaceclsError, match="unknown key 'model.wieghts'"):
        load_recipe(str(bad))


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "facecls", "train", "--recipe", str(bad), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"FACECLS_JEMALLOC": "0", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.epochs must be >= 1" in proc.stderr
