"""Model families beyond DINOv2, one module per family (its config and transformers-style classes), over the
shared building blocks in `dinokit.layers`; DINOv2's live in `dinokit.config` / `dinokit.hf`."""
