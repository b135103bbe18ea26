"""The licence notice that travels with every DINOv3 weights file dinokit writes.

Meta's DINOv3 weights are "DINO Materials" under the DINOv3 License Agreement (spec dinov3.md §6); a converted or
re-saved checkpoint is a derivative of them and stays under that agreement, whatever dinokit's own (Apache-2.0)
licence. dinokit never ships weights; it writes this notice beside the weights it converts or saves.
"""

from __future__ import annotations

from pathlib import Path

from dinokit import atomic

LICENSE_NAME = "dinov3-license"
LICENSE_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
NOTICE_FILE = "LICENSE.md"

NOTICE = f"""# DINOv3 License

The model weights in this folder (or in the file this notice accompanies) are derived from Meta's DINOv3 weights,
which are "DINO Materials" licensed under the **DINOv3 License Agreement** (not under dinokit's Apache-2.0
licence). Using, modifying or redistributing them is subject to that agreement, including its trade-control and
acceptable-use terms; redistribution must include a copy of the agreement.

The agreement: {LICENSE_URL}

These weights were converted or saved by dinokit, which does not distribute DINOv3 weights itself.
"""

# Hugging Face model-card metadata for the license, as the timm/ and facebook/ DINOv3 repos declare it.
MODEL_CARD = f"""---
license: other
license_name: {LICENSE_NAME}
license_link: {LICENSE_URL}
library_name: dinokit
tags:
- dinov3
---

# DINOv3 weights saved by dinokit

{NOTICE.split(chr(10), 2)[2]}"""


def write_notice_dir(directory: str | Path) -> Path:
    """`LICENSE.md` (the notice) in a saved model folder, and a `README.md` model card with the licence metadata
    unless the folder already has one."""
    directory = Path(directory)
    atomic.write_text(directory / NOTICE_FILE, NOTICE)
    if not (directory / "README.md").exists():
        atomic.write_text(directory / "README.md", MODEL_CARD)
    return directory / NOTICE_FILE


def write_notice_beside(weights_file: str | Path) -> Path:
    """`<stem>.LICENSE.md` beside a single converted weights file."""
    weights_file = Path(weights_file)
    target = weights_file.with_name(weights_file.stem + "." + NOTICE_FILE)
    atomic.write_text(target, NOTICE)
    return target
