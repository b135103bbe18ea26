"""`dinokit curate --engine ray` on a real local Ray: k-NN searches and k-means assignments as Ray tasks give
the local engine's results, file for file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dinokit.curate.pipeline import CurateOptions, curate
from test_curate_pipeline import mixture, near_copies, write_folder

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")
pytest.importorskip("pyarrow")


pytestmark = pytest.mark.usefixtures("local_ray")


def test_vectors_travel_as_file_references_and_read_the_same_rows(tmp_path):
    from dinokit.curate.inputs import load_set

    x, _ = mixture(3)
    np.save(tmp_path / "pool.npy", x * 3)
    vectors = load_set(tmp_path / "pool.npy").vectors.subset(np.arange(5, 400, 3))
    sent = pickle.dumps(vectors)
    assert len(sent) < x.nbytes / 10  # the rows stay in the file
    assert np.array_equal(pickle.loads(sent)[:], vectors[:])


@pytest.mark.parametrize("exact_max", [100_000, 300], ids=["exact", "ivf"])
def test_engine_ray_gives_the_local_engines_files(tmp_path, capsys, exact_max):
    rng = np.random.default_rng(0)
    x, _ = mixture(4)
    pool = np.concatenate([x, near_copies(x, rng.choice(len(x), 40, replace=False), rng)])
    paths = [f"img{i:04d}.jpg" for i in range(len(pool))]
    folder = write_folder(tmp_path / "pool", pool, paths, shards=3)
    np.save(tmp_path / "eval.npy", near_copies(x, rng.choice(len(x), 10, replace=False), rng))
    np.save(tmp_path / "seed.npy", x[rng.choice(len(x), 30, replace=False)])
    outputs = {}
    for engine in ("local", "ray"):
        options = CurateOptions(target=300, levels=[40, 8], n_iters=3, resample_steps=2, retrieval="sample",
                                exact_max=exact_max, k=16, engine=engine)
        outputs[engine] = tmp_path / engine
        curate(folder, outputs[engine], seeds=[("seed", str(tmp_path / "seed.npy"))],
               excludes=[("eval", str(tmp_path / "eval.npy"))], options=options, quiet=engine == "local")
    tasks = [line for line in capsys.readouterr().err.splitlines() if "Ray tasks run" in line]
    assert len(tasks) == 1 and int(tasks[0].split("engine: ")[1].split()[0].replace(",", "")) > 20
    files = sorted(p.relative_to(outputs["local"]) for p in outputs["local"].rglob("*.npy"))
    files += [p.relative_to(outputs["local"]) for p in outputs["local"].glob("selected.*")]
    assert len(files) > 10 and any("retrieval" in str(f) for f in files)
    for name in files:
        assert (outputs["ray"] / name).read_bytes() == (outputs["local"] / name).read_bytes(), name
    assert (outputs["ray"] / "dedup" / "groups.csv").read_bytes() == (outputs["local"] / "dedup" / "groups.csv").read_bytes()
