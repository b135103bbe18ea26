"""The bad-input corpus through `dinokit discover` and `dinokit anomaly score` (the checks of tests/test_bad_inputs.py
for the training-free commands): a good case is in the output, a bad one is skipped, logged and listed in
OUT/errors.json, never a traceback."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dinokit.cli import main
from dinokit.data.images import display_path


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


def _listed_or_read(kind, path, out, read_paths) -> str:
    errors = json.loads((out / "errors.json").read_text()) if (out / "errors.json").exists() else []
    if kind == "good":
        assert display_path(path) in read_paths and not errors
        return "read"
    assert display_path(path) not in read_paths and [e["path"] for e in errors] == [display_path(path)], errors
    return f"skipped, listed in errors.json ({errors[0]['reason'].split(' (')[0]})"


def check_discover(kind, path, root, models, tmp_path, capsys, caplog):
    out = tmp_path / "discovered"
    code, err = _run(["discover", str(root / "train" / "a"), "--model", models["backbone"], "-o", str(out),
                      "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    records = json.loads((out / "boxes.json").read_text())["images"]
    assert len(records) == (3 if kind == "good" else 2)
    return _listed_or_read(kind, path, out, {r["path"] for r in records})


def check_anomaly_score(kind, path, root, models, tmp_path, capsys, caplog):
    bank, out = Path(models["backbone"]).parent / "anomaly_bank", tmp_path / "scored"
    if not bank.exists():  # one bank for the whole matrix, beside the shared models
        code, err = _run(["anomaly", "fit", str(root / "val"), "--model", models["backbone"], "-o", str(bank),
                          "--resolution", "28", "--quiet", "--device", "cpu"], capsys)
        assert code == 0, err
    code, err = _run(["anomaly", "score", str(root / "train" / "a"), "--bank", str(bank), "-o", str(out),
                      "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "scores.csv").open(newline="")))
    assert len(rows) == (3 if kind == "good" else 2)
    return _listed_or_read(kind, path, out, {r["path"] for r in rows})


ZEROSHOT_CHECKS = {"discover": check_discover, "anomaly score": check_anomaly_score}
