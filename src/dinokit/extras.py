"""Optional dependencies (pyproject's extras): one check and one error that names the package and the extra.

Commands call `require(...)` before they start work, so a missing package stops them before anything is read or
written; the code that uses a package imports it with `optional_import`, which fails the same way.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Top-level import name -> (what to `pip install`, the dinokit extra that installs it; None: not in an extra).
PACKAGES: dict[str, tuple[str, str | None]] = {
    "pyarrow": ("pyarrow", "apps"),
    "faiss": ("faiss-cpu", "apps"),
    "scipy": ("scipy", "apps"),
    "sklearn": ("scikit-learn", "eval"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "ray": ("ray[data]", "ray"),
    "av": ("av", "video"),  # PyAV: MP4 / MKV / WebM ... frames for `dinokit track`
    "cuml": ("cuml-cu12", None),  # RAPIDS, CUDA only: https://docs.rapids.ai/install
}


class MissingExtraError(ImportError):
    """An optional package is not installed (or does not import); the message says what to install."""

    def __init__(self, purpose: str, missing: list[tuple[str, str | None]]):
        self.purpose = purpose
        self.missing = missing  # (import name, reason it failed when it is installed but broken, else None)
        super().__init__(_message(purpose, missing))


def _package(module: str) -> tuple[str, str | None]:
    top = module.split(".")[0]
    return PACKAGES.get(top, (top, None))


def _message(purpose: str, missing: list[tuple[str, str | None]]) -> str:
    packages = list(dict.fromkeys(_package(name)[0] for name, _ in missing))
    extras = sorted({extra for name, _ in missing if (extra := _package(name)[1])})
    loose = list(dict.fromkeys(_package(name)[0] for name, _ in missing if _package(name)[1] is None))
    broken = [f"{_package(name)[0]} is installed but does not import ({reason})" for name, reason in missing if reason]
    text = f"{purpose} needs {' and '.join(packages)}"
    if extras:
        text += f" (the {' and '.join(repr(e) for e in extras)} extra{'s' if len(extras) > 1 else ''})"
    text += f"; {'; '.join(broken)}" if broken else f", which {'is' if len(packages) == 1 else 'are'} not installed"
    install = ([f"pip install 'dinokit[{','.join(extras)}]'"] if extras else []) + \
        ([f"pip install {' '.join(loose)}"] if loose else [])
    return f"{text}. Install: {' and '.join(install)}"


def _try_import(module: str) -> tuple[ModuleType | None, str | None, bool]:
    """(module, reason, ok): reason is None when the package is simply absent."""
    try:
        return importlib.import_module(module), None, True
    except ImportError as exc:
        # The package itself (or the named submodule) is absent: "not installed". Anything else -- a missing
        # shared library, a dependency of the package -- means it is installed but broken; keep that reason.
        absent = getattr(exc, "name", None) in _prefixes(module)
        return None, None if absent else f"{type(exc).__name__}: {exc}", False


def _prefixes(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def require(*modules: str, purpose: str) -> None:
    """Import every module (e.g. "pyarrow.parquet", "faiss"); raise one MissingExtraError listing all missing."""
    missing = []
    for module in modules:
        _, reason, ok = _try_import(module)
        if not ok:
            missing.append((module, reason))
    if missing:
        raise MissingExtraError(purpose, missing)


def optional_import(module: str, *, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtraError naming the package and its extra."""
    imported, reason, ok = _try_import(module)
    if not ok:
        raise MissingExtraError(purpose, [(module, reason)])
    return imported
