"""`dinokit.zeroshot.matching` on synthetic homographies of Imagenette photos, where the true correspondence is exact
(../shared/spec/zeroshot.md §2.4, "Synthetic homography PCK").

Each pair (--pairs, default 12; fixed seeds): A = an Imagenette val photo (224 x 224); H moves A's four corners by
U(-rho, rho) * 224 each (rho 0.15), redrawn while it flips orientation or changes the area by more than 2x;
B = A warped by H (bilinear). Queries = A's patch centres whose whole 14 x 14 footprint maps inside B; the truth of
a query is H applied to its centre. The prediction is the centre of the B patch nearest to the query's patch
(`dense_matches`, the DINOv3 notebook's rule), at --size 224 (16 x 16 patches of 14).

PCK is pooled over all queries of all pairs, at alpha * 224 px for alpha 0.05 and 0.1, and at one patch (14 px).
`mutual` = the share of queries whose match is a mutual nearest neighbour; `PCK@patch mutual` = PCK@patch among
those (best buddies trade coverage for precision).

Rows:
- `identity`: predict the query's own position (no matching): what the warp alone leaves correct;
- `oracle`: features = random Fourier features of each patch centre's position in A's frame (B's centres are taken
  back to A by H^-1): the matcher's ceiling at this patch size;
- `raw pixels`: a patch's centred, normalised 14 x 14 x 3 pixels (`tracking.PixelEncoder`);
- `random ViT-S/14`: the `vits14` preset, RANDOMLY INITIALISED (no trained weights can be downloaded here);
- with `--trained MODEL`, `trained ...`: a `dinokit train` model with small patches (e.g. the CIFAR-10 micro ViT,
  patch 4) on the same 14-pixel grid, each image shrunk by patch / 14 first (`cell_encoder.py`);
  `--only-trained` skips the other rows.

    nice -n 10 python benchmarks/zeroshot_match.py --results benchmarks/results_zeroshot_match.json
    python benchmarks/zeroshot_match.py --trained RUN/teacher --only-trained \
        --results benchmarks/results_zeroshot_match_trained.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.zeroshot.matching import Side, dense_matches, encode, pck
from dinokit.zeroshot.tracking import PixelEncoder, as_encoder

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "imagenette" / "val"
SIZE = 224
PATCH = 14
ALPHAS = (0.05, 0.1)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3 x 3 H with H @ (x, y, 1) ~ dst for the four (x, y) points of src (DLT, h33 = 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows, float), np.array(rhs, float)), 1.0).reshape(3, 3)


def apply(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ H.T
    return p[:, :2] / p[:, 2:3]


def quad_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def random_homography(rng, size: int = SIZE, rho: float = 0.15) -> np.ndarray:
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], float)
    while True:
        moved = corners + rng.uniform(-rho, rho, corners.shape) * size
        ratio = quad_area(moved) / quad_area(corners)
        H = homography(corners, moved)
        if np.linalg.det(H) > 0 and 0.5 <= ratio <= 2:
            return H


def warp(image: Image.Image, H: np.ndarray) -> Image.Image:
    inverse = np.linalg.inv(H)
    inverse /= inverse[2, 2]
    return image.transform(image.size, Image.PERSPECTIVE, tuple(inverse.reshape(-1)[:8]), Image.BILINEAR)


def pairs(count: int, rho: float):
    files = sorted(DATA.glob("*/*"))
    rng = np.random.default_rng(0)
    for index in rng.choice(len(files), count, replace=False):
        image = Image.open(files[index]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
        H = random_homography(rng, rho=rho)
        yield str(files[index].relative_to(DATA)), image, warp(image, H), H


def queries(H: np.ndarray, grid: int = SIZE // PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of A's patches whose footprint lands inside B, and H of their centres."""
    keep, truth = [], []
    for i in range(grid):
        for j in range(grid):
            corners = np.array([[j, i], [j + 1, i], [j + 1, i + 1], [j, i + 1]], float) * PATCH
            mapped = apply(H, corners)
            if (mapped >= 0).all() and (mapped <= SIZE).all():
                keep.append(i * grid + j)
                truth.append(apply(H, np.array([[(j + 0.5) * PATCH, (i + 0.5) * PATCH]]))[0])
    return np.array(keep), np.array(truth)


def fourier(points: np.ndarray, dims: int = 128, scale: float = 1 / 25) -> torch.Tensor:
    freqs = np.random.default_rng(123).normal(0, scale, (2, dims // 2))
    angles = points @ freqs
    return torch.from_numpy(np.c_[np.cos(angles), np.sin(angles)]).float()


def oracle_sides(H: np.ndarray) -> tuple[Side, Side]:
    grid = SIZE // PATCH
    centres = (np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="xy"), -1).reshape(-1, 2) + 0.5) * PATCH
    fa = fourier(centres).reshape(grid, grid, -1)
    fb = fourier(apply(np.linalg.inv(H), centres)).reshape(grid, grid, -1)
    return Side(fa, (SIZE, SIZE), PATCH), Side(fb, (SIZE, SIZE), PATCH)


def evaluate(data, sides_of) -> dict:
    predicted, truth, mutual = [], [], []
    for _, a_image, b_image, H in data:
        a, b = sides_of(a_image, b_image, H)
        found = dense_matches(a, b)
        keep, true_xy = queries(H)
        if sides_of is identity_sides:
            guess = a.centres(keep)
            is_mutual = np.ones(len(keep), bool)
        else:
            guess = b.centres(found.index_b[keep])
            is_mutual = found.mutual[keep]
        predicted.append(guess)
        truth.append(true_xy)
        mutual.append(is_mutual)
    predicted, truth, mutual = np.concatenate(predicted), np.concatenate(truth), np.concatenate(mutual)
    row = {f"PCK@{alpha}": pck(predicted, truth, alpha * SIZE) for alpha in ALPHAS}
    row["PCK@patch"] = pck(predicted, truth, PATCH)
    row["mutual"] = float(mutual.mean())
    row["PCK@patch mutual"] = pck(predicted[mutual], truth[mutual], PATCH)
    row["queries"] = int(len(truth))
    return row


def identity_sides(a_image, b_image, H):
    grid = SIZE // PATCH
    zero = torch.ones(grid, grid, 1)
    return Side(zero, (SIZE, SIZE), PATCH), Side(zero, (SIZE, SIZE), PATCH)


def encoder_sides(encoder):
    return lambda a_image, b_image, H: (encode(a_image, encoder, SIZE), encode(b_image, encoder, SIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--rho", type=float, default=0.15)
    parser.add_argument("--results", default=None, help="JSON file to write")
    parser.add_argument("--trained", default=None, help="a trained model (path) for the `trained` row")
    parser.add_argument("--only-trained", action="store_true", help="only the --trained row")
    parser.add_argument("--picture", default=None, help="only draw the first pair's matches by the random "
                                                        "ViT-S/14 (mutual ones) to this PNG")
    args = parser.parse_args()
    if args.only_trained and not args.trained:
        parser.error("--only-trained needs --trained MODEL")
    if args.picture:
        from dinokit import load_model
        from dinokit.zeroshot.matching import match, picture

        torch.manual_seed(0)
        _, a_image, b_image, _ = next(pairs(1, args.rho))
        result = match(a_image, b_image, load_model("vits14").eval(), size=SIZE, mutual=True)
        picture(a_image, b_image, result, distance=20).save(args.picture)
        return

    from machine import cpu_description

    from dinokit import load_model

    torch.manual_seed(0)
    vit = as_encoder(load_model("vits14").eval())
    data = list(pairs(args.pairs, args.rho))
    rows = {} if args.only_trained else {
        "identity": identity_sides, "oracle": lambda a, b, H: oracle_sides(H),
        "raw pixels": encoder_sides(PixelEncoder(PATCH)), "random ViT-S/14": encoder_sides(vit)}
    if args.trained:
        from cell_encoder import CellEncoder, load_trained

        trained, trained_name = load_trained(args.trained)
        rows[trained_name] = encoder_sides(CellEncoder(trained, PATCH))
    load_before = os.getloadavg()
    table = {}
    for name, sides_of in rows.items():
        start = time.perf_counter()
        table[name] = evaluate(data, sides_of)
        table[name]["seconds"] = round(time.perf_counter() - start, 2)
        r = table[name]
        print(f"{name:16s} PCK@0.05 {100 * r['PCK@0.05']:5.1f}  PCK@0.1 {100 * r['PCK@0.1']:5.1f}  "
              f"PCK@patch {100 * r['PCK@patch']:5.1f}  mutual {100 * r['mutual']:5.1f}  "
              f"PCK@patch|mutual {100 * r['PCK@patch mutual']:5.1f}  ({r['queries']} queries, {r['seconds']} s)",
              flush=True)
    result = {"machine": cpu_description(), "load_average_before": [round(v, 2) for v in load_before],
              "load_average_after": [round(v, 2) for v in os.getloadavg()], "pairs": args.pairs, "rho": args.rho,
              "size": SIZE, "patch": PATCH, "homographies": {name: H.round(6).tolist() for name, _, _, H in data},
              "table": table,
              "note": "random ViT-S/14 = vits14 preset, randomly initialised: no trained weights here",
              "trained_model": args.trained}
    if "random ViT-S/14" in table:
        result["pairs_per_second_random_vits14"] = round(args.pairs / table["random ViT-S/14"]["seconds"], 3)
    print(result["machine"])
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
