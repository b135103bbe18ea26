"""Missing optional extras: every command stops before it starts work, with one line naming the package, the
extra and the install command (exit 2, no traceback, nothing written)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model
from dinokit.cli import main
from dinokit.extras import MissingExtraError, optional_import, require


def hide(monkeypatch, *names: str) -> None:
    """Make `import name` (and its submodules) raise ImportError, as when the package is not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """An ImageFolder tree (two classes, three images each) of small random images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def embedded(labelled, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "emb"
    assert main(["embed", str(labelled), "--model", str(model_dir), "--output", str(out), "--image-size", "28",
                 "--num-workers", "0", "--quiet"]) == 0
    return out


def one_line_error(capsys, package: str, extra: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert package in lines[0] and f"pip install 'dinokit[{extra}]'" in lines[0], lines[0]
    return lines[0]


def test_embed_without_pyarrow_stops_before_creating_the_output_folder(monkeypatch, labelled, model_dir,
                                                                       tmp_path, capsys):
    hide(monkeypatch, "pyarrow")
    out = tmp_path / "emb"
    code = main(["embed", str(labelled), "--model", str(model_dir), "--output", str(out), "--image-size", "28",
                 "--num-workers", "0", "--quiet"])
    assert code == 2
    line = one_line_error(capsys, "pyarrow", "apps")
    assert line.startswith("dinokit embed: error:")
    assert not out.exists()


@pytest.mark.parametrize("module, package", [("faiss", "faiss-cpu"), ("pyarrow", "pyarrow")])
def test_index_without_its_packages_names_them_and_writes_nothing(monkeypatch, embedded, tmp_path, capsys,
                                                                 module, package):
    hide(monkeypatch, module)
    out = tmp_path / "index"
    assert main(["index", str(embedded), "--output", str(out)]) == 2
    one_line_error(capsys, package, "apps")
    assert not out.exists()


def test_search_without_faiss_names_faiss_cpu_and_the_apps_extra(monkeypatch, embedded, labelled, capsys):
    assert main(["index", str(embedded), "--output", str(embedded / "index")]) == 0
    capsys.readouterr()
    hide(monkeypatch, "faiss")
    assert main(["search", str(embedded), str(labelled / "cat" / "0.png")]) == 2
    one_line_error(capsys, "faiss-cpu", "apps")


@pytest.mark.parametrize("module, package", [("scipy", "scipy"), ("faiss", "faiss-cpu")])
def test_dedup_without_its_packages_names_them_and_writes_nothing(monkeypatch, embedded, tmp_path, capsys,
                                                                 module, package):
    hide(monkeypatch, module)
    out = tmp_path / "groups.csv"
    assert main(["dedup", str(embedded), "--output", str(out)]) == 2
    line = one_line_error(capsys, package, "apps")
    assert "ModuleNotFoundError" not in line
    assert not out.exists()


def test_eval_logreg_without_scikit_learn_stops_before_extracting_features(monkeypatch, labelled, model_dir,
                                                                          tmp_path, capsys):
    hide(monkeypatch, "sklearn")
    cache = tmp_path / "cache"
    code = main(["eval", "logreg", "--model", str(model_dir), "--train", str(labelled), "--val", str(labelled),
                 "--cache-dir", str(cache), "--num-workers", "0", "--resize", "28", "--crop", "28", "--quiet"])
    assert code == 2
    line = one_line_error(capsys, "scikit-learn", "eval")
    assert line.startswith("dinokit eval logreg: error:")
    assert not cache.exists()  # no features were computed (and cached) first


def test_eval_logreg_cuml_backend_without_cuml_says_what_to_install(monkeypatch, labelled, model_dir, capsys):
    hide(monkeypatch, "cuml")
    code = main(["eval", "logreg", "--backend", "cuml", "--model", str(model_dir), "--train", str(labelled),
                 "--val", str(labelled), "--no-cache", "--num-workers", "0", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cuml-cu12" in err and "pip install" in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["onnxscript", "onnxruntime", "onnx"])
def test_export_onnx_without_an_export_package_names_it_and_writes_nothing(monkeypatch, model_dir, tmp_path,
                                                                          capsys, module):
    hide(monkeypatch, module)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(out), "--opset", "18"]) == 2
    line = one_line_error(capsys, module, "export")
    assert "Try --opset" not in line  # the old advice at opset 18 was to use opset 18
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_onnx_at_opset_17_does_not_need_onnxscript(monkeypatch):
    from dinokit.export.onnx import export_modules

    assert "onnxscript" not in export_modules(17)
    assert "onnxscript" in export_modules(18)


def test_require_lists_every_missing_package_and_every_extra(monkeypatch):
    hide(monkeypatch, "faiss", "sklearn")
    with pytest.raises(MissingExtraError) as caught:
        require("numpy", "faiss", "sklearn", purpose="this job")
    message = str(caught.value)
    assert message.startswith("this job needs faiss-cpu and scikit-learn")
    assert "pip install 'dinokit[apps,eval]'" in message
    assert isinstance(caught.value, ImportError)  # callers catching ImportError keep working


def test_a_package_that_is_installed_but_broken_is_reported_with_its_own_import_error(monkeypatch, tmp_path):
    (tmp_path / "faiss").mkdir()
    (tmp_path / "faiss" / "__init__.py").write_text("import _swigfaiss_missing_native_part\n")
    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as caught:
        optional_import("faiss", purpose="indexing")
    message = str(caught.value)
    assert "faiss-cpu is installed but does not import" in message
    assert "_swigfaiss_missing_native_part" in message and "pip install 'dinokit[apps]'" in message


def test_embed_engine_ray_without_ray_names_the_ray_extra_and_writes_nothing(monkeypatch, capsys, labelled,
                                                                              model_dir, tmp_path):
    hide(monkeypatch, "ray")
    out = tmp_path / "emb"
    assert main(["embed", str(labelled), "--model", str(model_dir), "--output", str(out), "--engine", "ray",
                 "--quiet"]) == 2
    assert "ray[data]" in one_line_error(capsys, "ray", "ray")
    assert not out.exists()


def test_curate_engine_ray_without_ray_names_the_ray_extra_and_writes_nothing(monkeypatch, capsys, tmp_path):
    hide(monkeypatch, "ray")
    np.save(tmp_path / "pool.npy", np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32))
    out = tmp_path / "curated"
    assert main(["curate", str(tmp_path / "pool.npy"), "-o", str(out), "--engine", "ray", "--quiet"]) == 2
    assert "ray[data]" in one_line_error(capsys, "ray", "ray")
    assert not out.exists()


def test_track_on_an_mp4_without_pyav_names_the_video_extra_and_writes_nothing(monkeypatch, model_dir, tmp_path,
                                                                              capsys):
    hide(monkeypatch, "av")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)  # never opened: the missing package is found first
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "out"
    assert main(["track", str(tmp_path / "clip.mp4"), "--mask", str(tmp_path / "first.png"), "--model",
                 str(model_dir), "-o", str(out)]) == 2
    line = one_line_error(capsys, "av", "video")
    assert "decoding the .mp4 video clip.mp4 (or give a folder of its frames: ffmpeg -i clip.mp4" in line, line
    assert not out.exists()
