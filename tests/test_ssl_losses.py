"""DINOv2's losses and head against independent re-computations of their formulas (training.md §3-4)."""

from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinokit.ssl import (
    DINOHead,
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    multicrop_dino_loss,
    weight_norm_keys_to_meta,
)

TEACHER_TEMP = 0.05
STUDENT_TEMP = 0.1


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _cross_entropy(teacher_probs: np.ndarray, student_logits: np.ndarray) -> np.ndarray:
    """−Σ_k t_k log softmax(s / τ_s)_k per row."""
    return -(teacher_probs * _log_softmax(student_logits / STUDENT_TEMP)).sum(-1)


def _sinkhorn_reference(logits: np.ndarray, temp: float, n_iterations: int = 3) -> np.ndarray:
    """The spec's Sinkhorn-Knopp written on a (B, K) matrix in float64."""
    n_samples, n_prototypes = logits.shape
    P = np.exp((logits - logits.max()) / temp)  # the shift cancels in the first normalisation
    P /= P.sum()
    for _ in range(n_iterations):
        P /= P.sum(axis=0, keepdims=True)  # per prototype
        P /= n_prototypes
        P /= P.sum(axis=1, keepdims=True)  # per sample
        P /= n_samples
    return P * n_samples


# --- DINO loss -------------------------------------------------------------------------------------------------


def test_dino_forward_is_the_sum_over_pairs_of_the_image_averaged_cross_entropy():
    torch.manual_seed(0)
    students = [torch.randn(5, 32) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(5, 32), -1) for _ in range(2)]
    loss = DINOLoss(32, student_temp=STUDENT_TEMP)(students, teachers)
    expected = sum(_cross_entropy(_np(t), _np(s)).mean() for s in students for t in teachers)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n_local", "n_terms"), [(8, 18), (3, 8), (0, 3)])  # 0 local crops: Meta's max(2n, 1) + 2
def test_multicrop_dino_loss_matches_each_crop_pairing_divided_by_the_number_of_terms(n_local, n_terms):
    torch.manual_seed(n_local)
    batch, k = 4, 24
    student_global = torch.randn(2 * batch, k)
    student_local = torch.randn(n_local * batch, k) if n_local else None
    teacher = torch.softmax(torch.randn(2, batch, k), -1)  # teacher[i]: the teacher's output for global crop i
    losses = multicrop_dino_loss(DINOLoss(k), student_global, student_local, teacher, n_local)

    s_global, s_local, t = _np(student_global).reshape(2, batch, k), _np(student_local) if n_local else None, _np(teacher)
    local_terms = [_cross_entropy(t[g], s_local[j * batch : (j + 1) * batch]).mean()
                   for j in range(n_local) for g in range(2)]  # every local crop against both teacher globals
    global_terms = [_cross_entropy(t[1 - g], s_global[g]).mean() for g in range(2)]  # against the OTHER global
    assert losses["dino_global_crops_loss"].item() == pytest.approx(sum(global_terms) / n_terms, rel=1e-5)
    if n_local:
        assert losses["dino_local_crops_loss"].item() == pytest.approx(sum(local_terms) / n_terms, rel=1e-5)
    else:
        assert "dino_local_crops_loss" not in losses


def test_softmax_centering_uses_the_centre_one_step_late():
    torch.manual_seed(1)
    k, momentum = 16, 0.9
    loss = DINOLoss(k, center_momentum=momentum)
    center = np.zeros((1, k))
    for step in range(4):
        teacher = torch.randn(6, k) * 3 + step
        probs = loss.softmax_center_teacher(teacher, TEACHER_TEMP)
        np.testing.assert_allclose(_np(probs), _softmax((_np(teacher) - center) / TEACHER_TEMP), atol=1e-6)
        loss.update_center(teacher)
        np.testing.assert_allclose(_np(loss.center), center, atol=1e-6)  # not applied yet
        center = momentum * center + (1 - momentum) * _np(teacher).mean(0, keepdims=True)
    loss.apply_center_update()
    np.testing.assert_allclose(_np(loss.center), center, atol=1e-6)


def test_state_dict_applies_a_pending_centre_update():
    loss = DINOLoss(8)
    teacher = torch.randn(4, 8)
    loss.softmax_center_teacher(teacher, TEACHER_TEMP)
    loss.update_center(teacher)
    saved = loss.state_dict()["center"]
    np.testing.assert_allclose(_np(saved), 0.1 * _np(teacher).mean(0, keepdims=True), atol=1e-6)
    restored = DINOLoss(8)
    restored.load_state_dict(loss.state_dict())
    following = torch.randn(4, 8)
    torch.testing.assert_close(restored.softmax_center_teacher(following, 0.07),
                               loss.softmax_center_teacher(following, 0.07))


def test_dino_sinkhorn_knopp_matches_reference_and_rows_are_distributions():
    torch.manual_seed(2)
    teacher = torch.randn(12, 40)
    q = DINOLoss(40).sinkhorn_knopp_teacher(teacher, TEACHER_TEMP)
    assert q.dtype == torch.float32 and q.shape == (12, 40)
    np.testing.assert_allclose(_np(q), _sinkhorn_reference(_np(teacher), TEACHER_TEMP), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_np(q).sum(-1), 1.0, atol=1e-5)


def test_sinkhorn_knopp_stays_finite_for_logits_that_overflow_exp():
    teacher = torch.randn(8, 16) + 100.0  # exp(100 / 0.04) overflows float32 without the shift
    q = DINOLoss(16).sinkhorn_knopp_teacher(teacher, 0.04)
    assert torch.isfinite(q).all()
    # float32 resolves 100 / 0.04 = 2500 to ~2e-4, hence the looser tolerance
    np.testing.assert_allclose(_np(q), _sinkhorn_reference(_np(teacher), 0.04), rtol=2e-3, atol=1e-6)


# --- iBOT patch loss -------------------------------------------------------------------------------------------


def _random_masks(n_images: int, n_patches: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_images, n_patches, generator=g) < 0.3
    masks[0] = False  # an unmasked crop still counts in the denominator
    masks[1, :3] = True
    return masks


def test_ibot_forward_masked_weights_each_patch_by_its_image_and_divides_by_all_crops():
    torch.manual_seed(3)
    masks = _random_masks(6, 20, seed=0)
    n = int(masks.sum())
    k = 12
    student, teacher_logits = torch.randn(n, k), torch.randn(n, k)
    teacher = torch.softmax(teacher_logits / TEACHER_TEMP, -1)
    loss = iBOTPatchLoss(k).forward_masked(student, teacher, student_masks_flat=masks)

    ce = _cross_entropy(_np(teacher), _np(student))
    owner = np.repeat(np.arange(6), masks.sum(1).numpy())  # image of each masked patch (row-major order)
    per_image = [ce[owner == i].mean() for i in range(6) if (owner == i).any()]
    assert loss.item() == pytest.approx(sum(per_image) / 6, rel=1e-5)


def test_ibot_forward_masked_ignores_buffer_padding_and_matches_the_dense_forward():
    torch.manual_seed(4)
    masks = _random_masks(4, 16, seed=1)
    n, k = int(masks.sum()), 10
    dense_student, dense_teacher = torch.randn(4, 16, k), torch.softmax(torch.randn(4, 16, k), -1)
    ibot = iBOTPatchLoss(k)
    dense = ibot(dense_student, dense_teacher, masks)
    padded_student = torch.cat([dense_student[masks], torch.randn(5, k)])  # Meta's upperbound-sized buffer
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    masked = ibot.forward_masked(padded_student[:n], dense_teacher[masks], masks, n_masked_patches=n,
                                 masks_weight=weights)
    assert masked.item() == pytest.approx(dense.item(), rel=1e-5)


def test_ibot_softmax_centering_is_one_step_late_and_averages_over_patches():
    torch.manual_seed(5)
    k, momentum = 8, 0.9
    ibot = iBOTPatchLoss(k, center_momentum=momentum)
    center = np.zeros((1, 1, k))
    for _ in range(3):
        tokens = torch.randn(1, 7, k) * 2  # Meta passes (1, n_masked, K)
        probs = ibot.softmax_center_teacher(tokens, TEACHER_TEMP)
        np.testing.assert_allclose(_np(probs), _softmax((_np(tokens) - center) / TEACHER_TEMP), atol=1e-6)
        ibot.update_center(tokens)
        center = momentum * center + (1 - momentum) * _np(tokens).mean(1, keepdims=True)
    ibot.apply_center_update()
    np.testing.assert_allclose(_np(ibot.center), center, atol=1e-6)


def test_ibot_sinkhorn_knopp_uses_the_masked_patch_count_and_leaves_it_untouched():
    torch.manual_seed(6)
    tokens = torch.randn(9, 14) * 0.5
    count = torch.tensor([9])
    q = iBOTPatchLoss(14).sinkhorn_knopp_teacher(tokens, TEACHER_TEMP, n_masked_patches_tensor=count)
    np.testing.assert_allclose(_np(q), _sinkhorn_reference(_np(tokens), TEACHER_TEMP), rtol=1e-4, atol=1e-7)
    assert count.tolist() == [9]


# --- KoLeo -----------------------------------------------------------------------------------------------------


def test_koleo_is_minus_mean_log_distance_to_the_nearest_other_sample():
    torch.manual_seed(7)
    x = torch.randn(10, 6)
    loss = KoLeoLoss()(x)
    v = _np(x) / np.linalg.norm(_np(x), axis=1, keepdims=True)
    distances = np.linalg.norm(v[:, None] - v[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert loss.item() == pytest.approx(-np.log(distances.min(1)).mean(), rel=1e-4)


def test_koleo_runs_in_float32_for_half_precision_inputs():
    x = torch.randn(6, 8).bfloat16()
    loss = KoLeoLoss()(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(KoLeoLoss()(x.float()).item(), rel=1e-6)


def test_koleo_with_a_single_sample_raises_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 images"):
        KoLeoLoss()(torch.randn(1, 8))


# --- DINO head -------------------------------------------------------------------------------------------------


def test_dino_head_is_mlp_l2norm_then_weight_normalised_linear_with_unit_gain():
    torch.manual_seed(8)
    head = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (30, 1) and torch.all(g == 1) and g.requires_grad
    assert len(head.mlp) == 5 and head.last_layer.bias is None  # Linear, GELU, Linear, GELU, Linear
    x = torch.randn(4, 12)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    expected = z @ (g * v / v.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(head(x), expected)


def test_dino_head_loads_meta_weight_g_v_keys_and_exports_them():
    torch.manual_seed(9)
    head = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8)
    meta_state = weight_norm_keys_to_meta(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(meta_state)
    assert not any("parametrizations" in key for key in meta_state)

    meta_state["last_layer.weight_g"] = torch.rand(30, 1) + 0.5  # a trained, non-unit gain
    other = DINOHead(12, 30, hidden_dim=16, bottleneck_dim=8)
    other.load_state_dict(meta_state)
    x = torch.randn(3, 12)
    v = meta_state["last_layer.weight_v"]
    weight = meta_state["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    expected = torch.nn.functional.normalize(head.mlp(x), dim=-1) @ weight.t()
    torch.testing.assert_close(other(x), expected)


def test_dino_head_deepcopy_is_independent_of_the_original():
    head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4)
    teacher = copy.deepcopy(head)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.add_(1.0)
    x = torch.randn(2, 6)
    assert not torch.allclose(head(x), teacher(x))


# --- two processes ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_rank(rank: int, data: dict) -> dict:
    """What each rank computes on its share of the batch."""
    half = slice(rank * 4, rank * 4 + 4)
    out = {}
    dino = DINOLoss(16)
    out["dino_sk"] = dino.sinkhorn_knopp_teacher(data["cls1"][half], TEACHER_TEMP)
    dino.softmax_center_teacher(data["cls1"][half], TEACHER_TEMP)
    dino.update_center(data["cls1"][half])
    out["dino_centred"] = dino.softmax_center_teacher(data["cls2"][half], TEACHER_TEMP)
    dino.update_center(data["cls2"][half])
    dino.apply_center_update()
    out["dino_center"] = dino.center

    ibot = iBOTPatchLoss(16)
    patches = slice(0, 5) if rank == 0 else slice(5, 13)  # unequal masked-patch counts
    mine = data["patches"][patches]
    out["ibot_sk"] = ibot.sinkhorn_knopp_teacher(mine, TEACHER_TEMP, torch.tensor([len(mine)]))
    equal = slice(rank * 6, rank * 6 + 6)  # Meta's patch centre is exact for equal counts
    ibot.softmax_center_teacher(data["patches"][equal].unsqueeze(0), TEACHER_TEMP)
    ibot.update_center(data["patches"][equal].unsqueeze(0))
    out["ibot_centred"] = ibot.softmax_center_teacher(data["patches2"][equal].unsqueeze(0), TEACHER_TEMP)
    return out


def _distributed_worker(rank: int, world_size: int, port: int, data: dict, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(_per_rank(rank, data), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_knopp_and_centering_over_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(10)
    data = {"cls1": torch.randn(8, 16), "cls2": torch.randn(8, 16),
            "patches": torch.randn(13, 16), "patches2": torch.randn(13, 16)}
    mp.spawn(_distributed_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    dino = DINOLoss(16)
    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in ranks]),
                               dino.sinkhorn_knopp_teacher(data["cls1"], TEACHER_TEMP))
    dino.softmax_center_teacher(data["cls1"], TEACHER_TEMP)
    dino.update_center(data["cls1"])
    torch.testing.assert_close(torch.cat([r["dino_centred"] for r in ranks]),
                               dino.softmax_center_teacher(data["cls2"], TEACHER_TEMP))
    dino.update_center(data["cls2"])
    dino.apply_center_update()
    for r in ranks:
        torch.testing.assert_close(r["dino_center"], dino.center)

    ibot = iBOTPatchLoss(16)
    torch.testing.assert_close(
        torch.cat([r["ibot_sk"] for r in ranks]),
        ibot.sinkhorn_knopp_teacher(data["patches"][:13], TEACHER_TEMP, torch.tensor([13])),
    )
    ibot.softmax_center_teacher(data["patches"][:12].unsqueeze(0), TEACHER_TEMP)
    ibot.update_center(data["patches"][:12].unsqueeze(0))
    torch.testing.assert_close(torch.cat([r["ibot_centred"] for r in ranks], dim=1),
                               ibot.softmax_center_teacher(data["patches2"][:12].unsqueeze(0), TEACHER_TEMP))
