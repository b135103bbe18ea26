"""Training-free uses of patch features: video label propagation, matching, object discovery, anomaly scoring.

The functions under the commands are the package's names, so notebooks run the commands' own code:

    from dinokit.zeroshot import track, match, discover, anomaly_fit, anomaly_score

`track` (`tracking.track`), `match` (`matching.match`), `discover` (`discovery.discover`), `anomaly_fit` /
`anomaly_score` (`anomaly.fit` / `anomaly.score`), and the evaluators over files `evaluate_davis`
(`davis_files.evaluate_folders`) and `evaluate_correspondence` (`pck_files.evaluate_files`). The modules are named
for their job (tracking, matching, discovery) so that no function shadows a module. The names are imported on
first use: `import dinokit.zeroshot` (which every `dinokit` command does) stays cheap.

Every job reads its features through `dinokit.zeroshot.features` (one extractor for all of them); each job's
module owns its references' resize rule, since those differ (see ../shared/spec/zeroshot.md §0)."""

from __future__ import annotations

import importlib

# name -> (module, attribute)
_EXPORTS = {
    "track": ("dinokit.zeroshot.tracking", "track"),
    "match": ("dinokit.zeroshot.matching", "match"),
    "discover": ("dinokit.zeroshot.discovery", "discover"),
    "anomaly_fit": ("dinokit.zeroshot.anomaly", "fit"),
    "anomaly_score": ("dinokit.zeroshot.anomaly", "score"),
    "evaluate_davis": ("dinokit.zeroshot.davis_files", "evaluate_folders"),
    "evaluate_correspondence": ("dinokit.zeroshot.pck_files", "evaluate_files"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dinokit.zeroshot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
