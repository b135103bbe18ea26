"""`dinokit.output_folder` / `atomic.staged_folder`: a whole output folder is replaced in one step or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

import dinokit
from dinokit import atomic, output_folder

OURS = output_folder.has_file("run.json")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def _previous_output(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "frames").mkdir()
    (out / "frames" / "old.png").write_bytes(b"old")
    return _tree(out)


def test_success_replaces_the_whole_folder_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    _previous_output(out)
    with output_folder.staged_output(out, "dinokit test", OURS) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.") and not any(staging.iterdir())
        assert (out / "frames" / "old.png").is_file()  # OUT untouched while the run writes
        (staging / "run.json").write_text('{"new": 1}')
    assert _tree(out) == {"run.json": b'{"new": 1}'}  # the old run's frames are gone, not merged
    assert _siblings(out) == []  # no staging folder, no .old folder, no lock file


def test_a_new_folder_is_created(tmp_path):
    out = tmp_path / "deeper" / "out"
    with output_folder.staged_output(out, "dinokit test", OURS) as staging:
        (staging / "run.json").write_text("{}")
    assert _tree(out) == {"run.json": b"{}"}


@pytest.mark.parametrize("error", [RuntimeError("model failed"), KeyboardInterrupt()])
def test_failure_leaves_the_folder_exactly_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    before = _previous_output(out)
    with pytest.raises(type(error)):
        with output_folder.staged_output(out, "dinokit test", OURS) as staging:
            (staging / "run.json").write_text("half")
            raise error
    assert _tree(out) == before and _siblings(out) == []


def test_failure_on_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_folder.staged_output(out, "dinokit test", OURS):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staging_folders_of_killed_runs_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    for stale in (".out.k1ll3d", ".out.old"):  # a killed run's staging folder; a kill between the two renames
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "run.json").write_text("stale")
    for keep in (".outer.x", "out2", ".other.old"):  # other folders' names, not ours
        (tmp_path / keep).mkdir()
    (tmp_path / ".out.note").write_text("a file, not a staging folder")
    with output_folder.staged_output(out, "dinokit test", OURS) as staging:
        (staging / "run.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.old", ".out.note", ".outer.x", "out", "out2"]


def test_a_name_with_glob_characters_is_a_name_not_a_pattern(tmp_path):
    out = tmp_path / "run[1]"
    (tmp_path / ".run1.x").mkdir()  # read as a glob, `[1]` would match "1" and delete this folder
    (tmp_path / ".run[1].k1ll3d").mkdir()
    assert atomic.remove_stale_staging(out) == [tmp_path / ".run[1].k1ll3d"]
    assert (tmp_path / ".run1.x").is_dir()


def test_a_file_or_a_folder_of_other_files_is_refused_and_kept(tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("mine")
    with pytest.raises(ValueError, match=r"--output .*out.txt is a file: give a folder"):
        with output_folder.staged_output(file, "dinokit test", OURS):
            pass
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(ValueError, match="exists and holds other files: give a new or empty folder"):
        with output_folder.staged_output(other, "dinokit test", OURS):
            pass
    assert file.read_text() == "mine" and _tree(other) == {"holiday.jpg": b"jpg"}
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)  # hidden files do not make a folder someone else's
    with output_folder.staged_output(empty, "dinokit test", OURS) as staging:
        (staging / "run.json").write_text("{}")
    assert _tree(empty) == {"run.json": b"{}"}


def test_a_second_writer_of_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    from dinokit.locking import OutputInUse

    out = tmp_path / "out"
    with output_folder.staged_output(out, "dinokit first", OURS):
        with pytest.raises(OutputInUse, match="dinokit first"):
            with output_folder.staged_output(out, "dinokit second", OURS):
                pass


def test_the_staging_folder_gets_the_permissions_of_a_new_folder(tmp_path):
    staging = atomic.staging_folder(tmp_path / "out")
    reference = tmp_path / "reference"
    reference.mkdir()
    assert staging.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_the_folder_swap_exists_once_in_the_package():
    # Review finding D1: it was copied into four commands; each now calls atomic.replace_folder.
    src = Path(dinokit.__file__).parent
    swapping = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py") if '.old"' in p.read_text())
    assert swapping == ["atomic.py"]
