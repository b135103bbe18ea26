"""Training-free uses of patch features: video label propagation, matching, object discovery, anomaly scoring.

Every job reads its features through `dinokit.zeroshot.features` (one extractor for all of them); each job's
module owns its references' resize rule, since those differ (see ../shared/spec/zeroshot.md §0)."""
