"""Dinov2ForSemanticSegmentation has transformers' segmentation API: labels -> cross-entropy with ignore index
255 on upsampled logits, tuples with return_dict=False, save/load, and post_process_semantic_segmentation on
the image processor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dinokit
from dinokit.dense import Dinov2ForSemanticSegmentation, post_process_semantic_segmentation

from helpers import images, max_diff, randomize_


def _segmenter(head="linear"):
    config = dinokit.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28,
                                  patch_size=14, num_labels=3, segmentation_head=head)
    return randomize_(Dinov2ForSemanticSegmentation(config), seed=0).eval()


def test_loss_is_cross_entropy_on_bilinear_upsampled_logits_ignoring_255():
    model = _segmenter()
    x = images(2, 28, 42, seed=1)
    labels = torch.randint(0, 3, (2, 28, 42), generator=torch.Generator().manual_seed(2))
    labels[:, :5] = 255
    out = model(x, labels=labels)
    up = F.interpolate(out.logits, size=(28, 42), mode="bilinear", align_corners=False)
    keep = labels != 255
    expected = F.cross_entropy(up.permute(0, 2, 3, 1)[keep], labels[keep])
    assert out.logits.shape == (2, 3, 2, 3)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_return_dict_false_gives_loss_logits_tuple():
    model = _segmenter()
    x = images(1, 28, 28)
    labels = torch.zeros(1, 28, 28, dtype=torch.long)
    loss, logits = model(x, labels=labels, return_dict=False)
    assert logits.shape == (1, 3, 2, 2) and loss.dim() == 0
    (only,) = model(x, return_dict=False)
    assert torch.equal(only, logits)
    assert len(model(x, output_hidden_states=True, return_dict=False)) == 2


@pytest.mark.parametrize("head", ["linear", "ms"])
def test_save_and_load_roundtrip_keeps_logits_and_head_type(tmp_path, head):
    model = _segmenter(head)
    model.save_pretrained(tmp_path)
    loaded = Dinov2ForSemanticSegmentation.from_pretrained(tmp_path)
    x = images(1, 30, 45, seed=3)
    assert loaded.head_type == head
    assert max_diff(model(x).logits, loaded(x).logits) == 0.0


def test_backbone_checkpoint_without_head_is_refused_by_name(tmp_path):
    _segmenter().dinov2.save_pretrained(tmp_path)
    with pytest.raises(dinokit.checkpoints.CheckpointError, match="no segmentation head"):
        Dinov2ForSemanticSegmentation.from_pretrained(tmp_path)


def test_post_process_resizes_each_image_and_argmaxes():
    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    outputs = type("Out", (), {"logits": logits})()
    maps = dinokit.Dinov2ImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(8, 10), (3, 7)])
    assert [tuple(m.shape) for m in maps] == [(8, 10), (3, 7)]
    expected = F.interpolate(logits[1:], size=(3, 7), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(maps[1], expected)
    low = post_process_semantic_segmentation(outputs)
    assert torch.equal(low[0], logits[0].argmax(0))
    with pytest.raises(ValueError, match="as many target sizes"):
        post_process_semantic_segmentation(outputs, target_sizes=[(8, 10)])


def test_post_process_matches_transformers_on_the_same_logits():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import SemanticSegmenterOutput

    logits = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(5))
    theirs = transformers.DPTImageProcessor().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=logits), target_sizes=[(11, 13), (6, 4)])
    ours = post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits), target_sizes=[(11, 13), (6, 4)])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
