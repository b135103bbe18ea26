"""The README's code blocks run as written.

Every fenced block (```bash, ```sh, ```python) is run in a fresh folder, unless the line right above it (blank
lines allowed between) is `<!-- readme-test: skip: REASON -->`, which a reader does not see. A block a new section
adds is therefore tested without anyone touching this file. Indented code blocks are refused: they cannot carry a
language or a marker, so the test could not tell what to do with them.

What "as written" means where nothing can be downloaded -- the block's text is not edited, except where said:
- Hub ids (`facebook/dinov2-small`, ...) resolve offline (HF_HUB_OFFLINE=1) from a private Hugging Face cache in
  which the test has put, under each id the README names, a tiny random-weight model of that family (1 block,
  32 wide) with its preprocessor config. The commands run unchanged; the numbers are those of a random model.
- The inputs a block names are made: `photo.jpg` and a folder `photos/` of small generated images.
- `pip install 'dinokit[X]'` installs nothing (no network): extra X must exist in pyproject.toml and every package
  it names must be installed in a version it allows.
- `dinokit serve ...` is started with `--port <free port>` appended (port 8000 may be taken on a shared machine),
  must answer /api/health, and is then stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(?P<reason>.+?)\s*-->")
HUB_ID = re.compile(r"\bfacebook/dinov[23]-[a-z0-9-]+\b")
TIMEOUT = 240  # per block: a hang guard, not a speed bound (each block takes seconds)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # the reason, when marked


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, marker, language = i, fence.group(1), fence.group(2).lower()
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(marker):
            body.append(lines[i])
            i += 1
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        skip = SKIP.search(lines[above]) if above >= 0 else None
        blocks.append(Block(start + 1, language, "\n".join(body) + "\n", skip.group("reason") if skip else None))
        i += 1
    return blocks


def indented_code_blocks(text: str) -> list[int]:
    """Lines that start an indented code block: 4-space lines after a blank line, outside fences and lists."""
    found, lines, in_fence = [], text.splitlines(), False
    for n, line in enumerate(lines):
        if line.startswith(("```", "~~~")):
            in_fence = not in_fence
        elif (not in_fence and line.startswith("    ") and line.strip() and n > 0 and not lines[n - 1].strip()
              and not _in_list(lines, n)):
            found.append(n + 1)
    return found


def _in_list(lines: list[str], n: int) -> bool:
    for previous in reversed(lines[:n]):
        if previous.strip():
            return bool(re.match(r"^\s*([-*+]|\d+\.)\s", previous)) or previous.startswith("    ")
    return False


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_no_indented_code_blocks():
    lines = indented_code_blocks(README.read_text())
    assert not lines, (f"README.md lines {lines} start indented code blocks: fence them (```bash / ```python) so "
                       f"tests/test_readme.py runs them, or mark them <!-- readme-test: skip: REASON -->")


def test_every_block_is_run_or_skipped_with_a_reason():
    assert BLOCKS, "no code blocks found in README.md"
    for block in BLOCKS:
        assert block.skip or block.language in RUNNABLE, (
            f"README.md line {block.line}: a ```{block.language or '(no language)'} block cannot be run; give it "
            f"a language ({', '.join(sorted(RUNNABLE))}) or a <!-- readme-test: skip: REASON --> line above it")


# ------------------------------------------------------------------------------------------ the world a block sees
def _stand_in(hub_id: str, folder: Path) -> None:
    """A tiny random model saved under the layout of `hub_id`, with its preprocessor config."""
    from dinokit import Dinov2Config, Dinov2Model
    from dinokit.processing import Dinov2ImageProcessor, DINOv3ViTImageProcessor

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14)
    processor = Dinov2ImageProcessor()
    if "dinov3-convnext" in hub_id:
        from dinokit.models.dinov3_convnext import DINOv3ConvNextConfig, DINOv3ConvNextModel

        model = DINOv3ConvNextModel(DINOv3ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32]))
        processor = DINOv3ViTImageProcessor()
    elif "dinov3-vit" in hub_id:
        from dinokit.models.dinov3_vit import DINOv3ViTConfig, DINOv3ViTModel

        model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, patch_size=16))
        processor = DINOv3ViTImageProcessor()
    elif "with-registers" in hub_id:
        from dinokit import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **small))
    else:
        model = Dinov2Model(Dinov2Config(**small))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _hub_cache(root: Path, hub_ids: set[str]) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE layout: models--org--name/{refs/main, snapshots/<commit>/...})."""
    cache = root / "hub"
    for hub_id in sorted(hub_ids):
        repo = cache / ("models--" + hub_id.replace("/", "--"))
        commit = "0" * 40
        _stand_in(hub_id, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
    return cache


CHECK_EXTRA = r"""
import sys, tomllib
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement

extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]

def check(extra, seen=()):
    if extra not in extras:
        sys.exit(f"pip install 'dinokit[{extra}]': pyproject.toml has no extra {extra!r} ({', '.join(extras)})")
    for text in extras[extra]:
        requirement = Requirement(text)
        if requirement.name == "dinokit":
            for inner in requirement.extras - set(seen):
                check(inner, (*seen, extra))
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            sys.exit(f"dinokit[{extra}] needs {text}, which is not installed")
        if installed not in requirement.specifier:
            sys.exit(f"dinokit[{extra}] needs {text}; {installed} is installed")

for argument in sys.argv[2:]:
    for extra in argument.split("[", 1)[1].rstrip("]").split(","):
        check(extra.strip())
"""

WAIT_FOR_HEALTH = r"""
import json, sys, time, urllib.request
deadline = time.monotonic() + 300  # a hang guard: the server imports torch and loads the model first
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/api/health", timeout=5) as response:
            if json.load(response)["status"] == "ok":
                sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("no answer from /api/health")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shell_script(code: str, tools: Path) -> str:
    """The block's commands, as written, but for the two rewrites of the module notes (pip install, serve)."""
    out = ["set -euo pipefail"]
    for command in re.sub(r"\\\n", " ", code).splitlines():
        words = shlex.split(command, comments=True) if command.strip() else []
        if words[:2] == ["pip", "install"]:
            extras = [w for w in words[2:] if w.startswith("dinokit[")]
            assert extras, f"a README block installs something other than a dinokit extra: {command!r}"
            out.append(f"{shlex.quote(sys.executable)} {tools / 'check_extra.py'} {REPO / 'pyproject.toml'} "
                       + " ".join(map(shlex.quote, extras)))
        elif words[:2] == ["dinokit", "serve"]:
            port = _free_port()
            out += [f"{shlex.join(words)} --port {port} & server=$!",
                    "trap 'kill $server 2>/dev/null || true' EXIT",
                    f"{shlex.quote(sys.executable)} {tools / 'wait_for_health.py'} http://127.0.0.1:{port}",
                    "kill $server; wait $server || true; trap - EXIT"]
        else:
            out.append(command)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(environment, inputs folder) shared by the blocks: the hub cache, a `dinokit` command, tools, images."""
    root = tmp_path_factory.mktemp("readme")
    hub_ids = set(HUB_ID.findall(README.read_text()))
    cache = _hub_cache(root / "hf", hub_ids)
    tools = root / "tools"
    tools.mkdir()
    (tools / "check_extra.py").write_text(CHECK_EXTRA)
    (tools / "wait_for_health.py").write_text(WAIT_FOR_HEALTH)
    bin_dir = root / "bin"  # `dinokit` as installed: this interpreter's `python -m dinokit` (= cli.main)
    bin_dir.mkdir()
    (bin_dir / "dinokit").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m dinokit \"$@\"\n")
    (bin_dir / "dinokit").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    inputs = root / "inputs"
    (inputs / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(inputs / "photos" / f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(inputs / "photo.jpg")
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return env, inputs, tools


def _copy_inputs(inputs: Path, cwd: Path) -> None:
    import shutil

    shutil.copytree(inputs, cwd, dirs_exist_ok=True)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language in RUNNABLE or b.skip],
                         ids=lambda b: f"line{b.line}-{b.language or 'text'}")
def test_readme_block_runs_as_written(block, world, tmp_path):
    if block.skip:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    env, inputs, tools = world
    _copy_inputs(inputs, tmp_path)
    if RUNNABLE[block.language] == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-c", _shell_script(block.code, tools)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (f"README.md line {block.line} (```{block.language}) failed with exit code "
                                    f"{result.returncode}:\n{textwrap.indent(block.code, '    ')}\n"
                                    f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
