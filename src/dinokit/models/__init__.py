"""Model families over the shared `dinokit.layers`: one module per family with its config and its
transformers-style classes (DINOv2's live in `dinokit.config` / `dinokit.hf`)."""
