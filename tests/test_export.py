"""ONNX / TorchScript export and the inference backends, on tiny random models (every interpolation mode)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dinokit
from dinokit.backends import get_backend
from dinokit.cli import main
from dinokit.export import export_onnx, export_torchscript, quantize_onnx, read_metadata
from dinokit.export.onnx import ort_session
from dinokit.export.quantize import agreement, folder_images, generated_images

from conftest import require_dataset
from helpers import images, randomize_, small_config

SIZES = [(224, 224), (518, 518), (224, 308)]
BATCHES = (1, 3)
MODES = {
    "size": dict(),
    "size+antialias": dict(registers=4, interpolate_antialias=True),
    "offset": dict(interpolate_offset=0.1),
}


def tiny_model(seed: int = 0, **kw) -> dinokit.Dinov2Model:
    config = small_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, **kw)  # head_dim 32
    return randomize_(dinokit.Dinov2Model(config), seed=seed).eval()


def eager(model, pixels):
    with torch.no_grad():
        out = model(pixels)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`exported(mode)` -> (model, path, report): one ONNX file per interpolation mode (dynamic positions, opset
    18), made on first use and shared by the tests of this module."""
    files = {}

    def get(mode: str):
        if mode not in files:
            model = tiny_model(seed=len(mode), **MODES[mode])
            path = tmp_path_factory.mktemp("onnx") / f"{mode.replace('+', '_')}.onnx"
            files[mode] = model, path, export_onnx(model, path, batch_sizes=(1,))  # tests cover 2 batch sizes
        return files[mode]

    return get


@pytest.mark.parametrize("mode", list(MODES))
def test_onnx_matches_eager_at_three_sizes_and_two_batches_from_one_file(exported, mode):
    model, path, report = exported(mode)
    assert report.positions == "dynamic" and report.interpolation.startswith(mode.split("+")[0])
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]  # no mask input
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    for height, width in SIZES:
        for batch in BATCHES:
            pixels = images(batch, height, width, seed=height + batch)
            hidden, pooled = session.run(None, {"pixel_values": pixels.numpy()})
            ref_hidden, ref_pooled = eager(model, pixels)
            assert hidden.shape == ref_hidden.shape
            assert np.abs(hidden - ref_hidden).max() <= 1e-4, (mode, height, width, batch)
            assert np.abs(pooled - ref_pooled).max() <= 1e-4, (mode, height, width, batch)


def test_scale_factor_matrices_reproduce_torch_offset_interpolation_at_every_grid():
    from dinokit.export.graph import ScaleFactorPositions

    vit = tiny_model(seed=2, interpolate_offset=0.1).vit  # stored grid 37x37
    positions = ScaleFactorPositions(vit)
    for grid in [(1, 1), (5, 3), (16, 16), (16, 22), (36, 37), (37, 37), (50, 10), (74, 74)]:
        with torch.no_grad():
            expected = vit.position_embedding(vit.pos_embed, *grid, grid[0] * 14, grid[1] * 14)
            got = positions(vit.pos_embed, *grid)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5, grid
    assert torch.equal(got[:, :1], vit.pos_embed[:, :1])


def test_offset_mode_precomputed_grids_serve_declared_sizes_and_refuse_others(tmp_path):
    model = tiny_model(seed=7, interpolate_offset=0.1)
    path = tmp_path / "fixed.onnx"
    report = export_onnx(model, path, sizes=[224, 518, (224, 308)], positions="precomputed")
    assert report.positions == "precomputed" and read_metadata(path)["sizes"] == [[224, 224], [518, 518], [224, 308]]
    session = ort_session(path)
    for (height, width), batch in zip(SIZES, (1, 3, 2)):
        pixels = images(batch, height, width, seed=height)
        hidden, _ = session.run(None, {"pixel_values": pixels.numpy()})
        assert np.abs(hidden - eager(model, pixels)[0]).max() <= 1e-4
    other = images(1, 280, 280).numpy()
    with pytest.raises(Exception, match="out of"):  # raw onnxruntime: the grid lookup fails instead of drifting
        session.run(None, {"pixel_values": other})
    backend = get_backend(path, "onnxruntime")
    with pytest.raises(ValueError, match="224x224, 518x518, 224x308 only"):
        backend(torch.from_numpy(other))


def test_opset_17_keeps_dynamic_sizes_and_bakes_antialiased_grids_for_declared_sizes(tmp_path):
    import onnx

    model = tiny_model(seed=4)
    path = tmp_path / "size17.onnx"
    assert export_onnx(model, path, opset=17, batch_sizes=(1,)).positions == "dynamic"
    assert onnx.load(str(path)).opset_import[0].version == 17
    session = ort_session(path)
    for height, width in SIZES:
        pixels = images(2, height, width, seed=width)
        assert np.abs(session.run(None, {"pixel_values": pixels.numpy()})[0] - eager(model, pixels)[0]).max() <= 1e-4
    model = tiny_model(seed=6, registers=4, interpolate_antialias=True)
    report = export_onnx(model, tmp_path / "aa17.onnx", opset=17, sizes=[224, (224, 308)], batch_sizes=(2,))
    assert report.positions == "precomputed" and report.max_abs_diff <= 1e-4


def test_int8_embeddings_keep_cosine_on_generated_images(exported, tmp_path):
    _, path, _ = exported("size")
    quantized = quantize_onnx(path, tmp_path / "model.int8.onnx")
    assert read_metadata(quantized)["quantization"].startswith("dynamic int8")
    result = agreement(path, quantized, generated_images(16, 224))
    assert result.mean_cosine >= 0.99 and result.min_cosine >= 0.98, result.summary()


def test_int8_embeddings_keep_cosine_on_real_images(exported, tmp_path):
    _, path, _ = exported("size")
    folder = require_dataset("imagenette", "val")
    quantized = quantize_onnx(path, tmp_path / "model.int8.onnx")
    result = agreement(path, quantized, folder_images(folder, 24, 224), "real images")
    assert result.images == 24
    assert result.mean_cosine >= 0.99 and result.min_cosine >= 0.98, result.summary()


def test_torchscript_reloaded_in_a_fresh_process_gives_the_same_outputs(tmp_path):
    model = tiny_model(seed=5, interpolate_offset=0.1)  # the mode whose scale factor a plain trace would freeze
    path = tmp_path / "model.pt"
    report = export_torchscript(model, path, batch_sizes=(1,))
    assert report.max_abs_diff <= 1e-5
    inputs = [images(2, h, w, seed=h + w) for h, w in SIZES + [(700, 140)]]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        model = torch.jit.load({str(path)!r})
        with torch.no_grad():
            outputs = [model(x) for x in torch.load({str(tmp_path / 'inputs.pt')!r})]
        torch.save(outputs, {str(tmp_path / 'outputs.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True)
    for pixels, (hidden, pooled) in zip(inputs, torch.load(tmp_path / "outputs.pt")):
        ref_hidden, ref_pooled = eager(model, pixels)
        assert np.abs(hidden.numpy() - ref_hidden).max() <= 1e-5
        assert np.abs(pooled.numpy() - ref_pooled).max() <= 1e-5


@pytest.mark.parametrize("options, message", [
    (dict(sizes=[224, 500]), "not a positive multiple of the patch size 14"),
    (dict(opset=16), "opset 16 is too low"),
    (dict(positions="precomputed"), "needs the list of input sizes"),
    (dict(opset=17, model=dict(registers=4, interpolate_antialias=True)), "supports from opset 18"),
    (dict(positions="sometimes"), "positions must be"),
], ids=["size-not-multiple-of-14", "opset-too-low", "precomputed-without-sizes", "antialias-at-opset-17",
        "unknown-positions"])
def test_unsupported_export_configuration_is_a_clear_error_and_leaves_no_file(tmp_path, options, message):
    model = tiny_model(**options.pop("model", {}))
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "model.onnx", **options)
    assert list(tmp_path.iterdir()) == []


def test_export_that_fails_its_onnxruntime_check_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        export_onnx(tiny_model(), tmp_path / "model.onnx", sizes=[224], batch_sizes=(1,), tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_backends_share_one_interface_and_stay_close_to_torch(exported, tmp_path):
    model, path, _ = exported("size")
    pixels = images(2, 224, 308, seed=9)
    reference = get_backend(model, "torch")(pixels)
    fp32 = get_backend(model, "onnxruntime", onnx_path=path)
    int8 = get_backend(model, "onnxruntime-int8", onnx_path=path)
    compiled = get_backend(model, "compile", compiler="eager")  # inductor takes a minute to build on a CPU
    for backend in (fp32, int8, compiled):
        out = backend(pixel_values=pixels)
        assert out.last_hidden_state.shape == reference.last_hidden_state.shape
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
        assert backend.distance
    assert fp32.measure_distance(pixels)["max_abs_diff"] <= 1e-4
    assert compiled.measure_distance(pixels)["max_abs_diff"] <= 1e-5
    assert int8.measure_distance(pixels)["min_cosine"] >= 0.98
    with pytest.raises(ValueError, match="multiples of 14"):
        fp32(images(1, 224, 230))
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend(model, "tensorrt")


def test_export_command_writes_onnx_and_int8_and_prints_the_check(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model(seed=11).save_pretrained(model_dir)
    out = tmp_path / "exported" / "model.onnx"
    code = main(["export", "onnx", "--model", str(model_dir), "--out", str(out), "--sizes", "224", "--int8",
                 "--check-count", "8"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.is_file() and (out.parent / "model.int8.onnx").is_file()
    assert "onnxruntime vs eager max |Δ|" in printed and "mean cosine" in printed
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(tmp_path / "bad.onnx"),
                 "--sizes", "225"]) == 2
    assert "not a positive multiple" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
