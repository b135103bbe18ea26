"""The package-level API of `dinokit.zeroshot`: `track`, `match`, `discover`, `anomaly_fit`, `anomaly_score` (and
the file evaluators) are the functions under the commands, and no function shadows a module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dinokit.zeroshot as zeroshot

from helpers import save_tiny_model

NAMES = {"track": ("tracking", "track"), "match": ("matching", "match"), "discover": ("discovery", "discover"),
         "anomaly_fit": ("anomaly", "fit"), "anomaly_score": ("anomaly", "score"),
         "evaluate_davis": ("davis_files", "evaluate_folders"),
         "evaluate_correspondence": ("pck_files", "evaluate_files")}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_package_level_names_are_the_commands_functions(name):
    module, attribute = NAMES[name]
    assert getattr(zeroshot, name) is getattr(importlib.import_module(f"dinokit.zeroshot.{module}"), attribute)
    assert name in zeroshot.__all__ and name in dir(zeroshot)


def test_no_function_shadows_a_module_even_after_every_module_is_imported():
    from dinokit.zeroshot import discover, match, track  # noqa: F401 - the names first, then the modules

    for module in ("tracking", "matching", "discovery", "anomaly", "davis", "davis_files", "pck_files", "features",
                   "overlap", "corloc", "video", "masks"):
        importlib.import_module(f"dinokit.zeroshot.{module}")
    assert callable(zeroshot.track) and callable(zeroshot.match) and callable(zeroshot.discover)
    assert zeroshot.tracking.track is zeroshot.track and zeroshot.matching.match is zeroshot.match
    assert type(zeroshot.tracking).__name__ == "module"
    with pytest.raises(AttributeError, match="has no attribute 'tracker'"):
        zeroshot.tracker  # noqa: B018


def test_importing_the_package_stays_cheap():
    # Every `dinokit` command imports dinokit.zeroshot (its commands register there): the names load on first use.
    code = "import sys, dinokit.zeroshot; print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_documented_notebook_calls_run(tmp_path):
    """README / docs/zeroshot/*.md: `from dinokit.zeroshot import track, match, discover, anomaly_fit,
    anomaly_score`, called as shown, on a tiny random ViT (sizes kept small)."""
    from dinokit.zeroshot import anomaly_fit, anomaly_score, discover, match, track

    model = save_tiny_model(tmp_path / "model")
    frames, first_mask = [], np.zeros((96, 128), np.uint8)  # the README's red square moving right over grey
    for t in range(3):
        pixels = np.full((96, 128, 3), 90, np.uint8)
        pixels[32:64, 16 + 8 * t:48 + 8 * t] = (220, 30, 30)
        frames.append(Image.fromarray(pixels))
    first_mask[32:64, 16:48] = 1
    masks = list(track(frames, first_mask, model, preset="dino", short_side=56))
    assert len(masks) == 3 and masks[1].shape == (96, 128)
    result = match(frames[0], frames[2], model, points=[[30, 40]], size=56)
    assert result.points_b.shape == (1, 2)
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame{i}.png")
    found = discover([tmp_path / "frame0.png"], model, method="tokencut")[0]
    assert found.pixel_mask().shape == (96, 128)
    bank = anomaly_fit([tmp_path / "frame0.png", tmp_path / "frame1.png"], model, resolution=56, shots=2)
    bank.save(tmp_path / "bank")
    results = anomaly_score([tmp_path / "frame2.png"], tmp_path / "bank")
    assert results[0].heat.shape == (96, 128) and np.isfinite(results[0].score)
