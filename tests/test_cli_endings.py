"""How a command ends: Ctrl-C in one line with how to resume (exit 130); user-facing errors in one line (exit 2);
bugs keep their traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit import Dinov2Config, Dinov2Model
from dinokit.apps import cli as apps_cli
from dinokit.apps import store
from dinokit.cli import describe_error, main


def interrupt(args):
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_in_embed_is_one_line_with_the_resume_hint_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(apps_cli, "_embed", interrupt)
    assert main(["embed", "imgs", "--model", "m", "--output", "out"]) == 130
    assert capsys.readouterr().err == "dinokit embed: interrupted; rerun the same command to resume\n"


def test_ctrl_c_in_a_command_that_cannot_resume_says_only_interrupted(monkeypatch, capsys):
    monkeypatch.setattr(apps_cli, "_index", interrupt)
    assert main(["index", "emb"]) == 130
    assert capsys.readouterr().err == "dinokit index: interrupted\n"


def test_ctrl_c_in_train_says_to_resume_with_the_resume_flag(monkeypatch, capsys):
    from dinokit.ssl import trainer

    monkeypatch.setattr(trainer, "_train_command", interrupt)
    assert main(["train", "--data", "d", "--output", "o"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_ctrl_c_in_eval_promises_resuming_only_with_the_feature_cache(monkeypatch, capsys):
    from dinokit.eval import cli as eval_cli

    monkeypatch.setattr(eval_cli, "_eval_command", interrupt)
    common = ["--model", "m", "--train", "t", "--val", "v"]
    assert main(["eval", "knn", *common]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main(["eval", "knn", *common, "--no-cache"]) == 130
    assert capsys.readouterr().err == "dinokit eval knn: interrupted\n"


@pytest.fixture
def symlinked_images(tmp_path):
    """Many inputs at no cost: one small PNG under 1,000 names."""
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(image)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(1000):
        (folder / f"{i:05d}.png").symlink_to(image)
    return folder


def _family(pid: int):
    """(pid, /proc/PID folder, stat fields after the command name) of `pid` and each of its children."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        this = int(stat.parent.name)
        if this == pid or int(fields[1]) == pid:
            yield this, stat.parent, fields


def _children(pid: int) -> list[int]:
    """The decoding workers of process `pid`: its children forked from it (the same command line)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for this, folder, _ in _family(pid):
        try:
            if this != pid and (folder / "cmdline").read_bytes() == own:
                found.append(this)
        except OSError:
            continue
    assert found, f"process {pid} has no decoding workers"
    return sorted(found)


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _process_states(pid: int) -> str:
    """`pid` and its children: state, kernel wait channel, signal masks, threads and command, to explain a hang."""
    lines = []
    for this, folder, fields in _family(pid):
        try:
            wchan = (folder / "wchan").read_text()
            signals = " ".join("".join(line.split()[:2]) for line in (folder / "status").read_text().splitlines()
                               if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn")))
            command = (folder / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        lines.append(f"{this} state {fields[0]} wchan {wchan} {signals} threads {fields[17]} {command}")
    return "\n".join(lines)


@pytest.mark.slow
def test_sigint_to_a_running_embed_ends_in_one_line_even_with_a_stalled_worker_and_the_rerun_finishes(tmp_path, symlinked_images):
    model = tmp_path / "model"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                             patch_size=14)).save_pretrained(model)
    # Input 500 is a named pipe: reading it blocks (like a file on a stalled network disk) until someone writes,
    # so the run is certainly mid-way when the interrupt lands, however fast or loaded the machine is.
    stalled = symlinked_images / "00500.png"
    stalled.unlink()
    os.mkfifo(stalled)
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "dinokit", "embed", str(symlinked_images), "--model", str(model), "--output",
               str(out), "--image-size", "28", "--shard-size", "25", "--batch-size", "5", "--num-workers", "2",
               "--quiet"]
    # A terminal's Ctrl-C goes to the whole process group: the command and its decoding workers. The command
    # starts with SIGINT at its default, as a shell's foreground job does: a suite run as a background job
    # (`make test &` in a script) inherits SIGINT *ignored*, and the interrupt would then never arrive.
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_sigint_at_default)
    try:
        deadline = time.monotonic() + 90
        while not list((out / store.EMBEDDINGS_DIR).glob("*.npy")):  # a first shard: under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        # One decoding worker cannot run at all (stopped: it stands for a worker in an uninterruptible read or
        # starved of CPU), so it answers neither SIGINT nor SIGTERM. It must not hold up the exit: DataLoader's
        # own shutdown would wait on it 10 s, and multiprocessing's exit handler forever.
        os.kill(_children(proc.pid)[0], signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGINT)
        # The exit takes 2-5 s on 2 cores with a load of 10 (measured: nice 10, four busy loops); 60 s is a bound
        # on "Ctrl-C ends promptly", not a measurement, so it has a margin of more than 10x.
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the interrupted run had not ended after 60 s:\n{_process_states(proc.pid)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    manifest = json.loads((out / store.MANIFEST).read_text())
    assert not manifest["complete"], "the run ended before the interrupt"
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["dinokit embed: interrupted; rerun the same command to resume"]

    stalled.unlink()
    stalled.symlink_to(tmp_path / "image.png")
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / store.MANIFEST).read_text())["num_embedded"] == 1000


# ------------------------------------------------------------------------------------------------- errors
def raising(exc):
    def command(args):
        raise exc
    return command


def test_a_user_facing_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["search", str(tmp_path), "query.jpg", "-k", "0"]) == 2  # a ValueError of dinokit's own checks
    assert capsys.readouterr().err == "dinokit search: error: k must be at least 1, got 0\n"


def test_an_error_raised_inside_a_library_names_its_type_and_how_to_see_the_traceback(monkeypatch, capsys):
    def command(args):
        json.loads("{not json")  # a ValueError raised by the json module, not by a dinokit check

    monkeypatch.setattr(apps_cli, "_index", command)
    assert main(["index", "emb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinokit index: error: JSONDecodeError from json: ")
    assert "DINOKIT_DEBUG=1" in err and len(err.splitlines()) == 1


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(apps_cli, "_index", raising(TypeError("unsupported operand")))
    with pytest.raises(TypeError):
        main(["index", "emb"])


def test_dinokit_debug_shows_the_traceback_of_user_facing_errors_and_interrupts(monkeypatch):
    monkeypatch.setenv("DINOKIT_DEBUG", "1")
    monkeypatch.setattr(apps_cli, "_index", raising(ValueError("bad")))
    with pytest.raises(ValueError):
        main(["index", "emb"])
    monkeypatch.setattr(apps_cli, "_index", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(["index", "emb"])


def test_os_errors_from_any_depth_print_as_they_are():
    with pytest.raises(OSError) as caught:
        open("/nonexistent/dinokit-file").close()
    assert describe_error(caught.value) == "[Errno 2] No such file or directory: '/nonexistent/dinokit-file'"


@pytest.mark.parametrize("where", ["config", "override"])
def test_invalid_yaml_in_a_training_config_or_override_is_one_line_naming_it(tmp_path, capsys, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    extra = ["--config", str(bad)] if where == "config" else ["train.seed=[1"]
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert ("bad.yaml" if where == "config" else "train.seed=[1") in err and "not valid YAML" in err
    assert not (tmp_path / "run").exists()
