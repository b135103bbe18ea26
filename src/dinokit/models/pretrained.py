"""`PreTrainedModel`: what a model family's transformers-style classes share — `from_pretrained` /
`save_pretrained` over Hugging Face folders and hub ids, the output flags, device and dtype.

A family supplies `config_class`, `hf_state_dict()` (its weights under transformers' names) and
`load_state_dict_any(state, strict, source)` (weights of any layout it reads, with one clear error when they do not
fit), and sets `weights_license` when its weights carry a licence notice of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from dinokit.config import PretrainedConfig
from dinokit.hf import _load_weights, write_weights
from dinokit.models import dinov3_license

_LOADER_KWARGS = ("low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "local_files_only")


class PreTrainedModel(nn.Module):
    config_class: type[PretrainedConfig]
    main_input_name = "pixel_values"
    weights_license: str | None = None  # "dinov3": saved weights get the DINOv3 License notice

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def _resolve_flags(self, output_hidden_states, return_dict):
        config = self.config
        return (config.output_hidden_states if output_hidden_states is None else output_hidden_states,
                config.use_return_dict if return_dict is None else return_dict)

    # ------------------------------------------------------------ the family's hooks
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict_any(self, state: Mapping[str, torch.Tensor], strict: bool = True,
                            source: str = "checkpoint") -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ Hugging Face folders
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Weights (transformers' names and file layout), then `config.json`, then the weights' licence notice."""
        directory = write_weights(self.hf_state_dict(), save_directory, max_shard_size, safe_serialization)
        self.config.copy(architectures=[type(self).__name__]).save_pretrained(directory)
        if self.weights_license == "dinov3":
            dinov3_license.write_notice_dir(directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: PretrainedConfig | None = None, strict: bool = True, revision: str | None = None,
                        cache_dir: str | None = None, torch_dtype: torch.dtype | str | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        **config_overrides):
        """Load from a Hugging Face directory or hub id (config.json + model.safetensors / pytorch_model.bin)."""
        if model_args:
            raise TypeError("from_pretrained takes the model path and keyword arguments only")
        from dinokit.hub import resolve_file

        source = pretrained_model_name_or_path
        if config is None:
            config = cls.config_class.from_json_file(resolve_file(source, "config.json", revision=revision,
                                                                  cache_dir=cache_dir))
        for key, value in config_overrides.items():
            if not key.startswith("attn_implementation") and key not in _LOADER_KWARGS:
                setattr(config, key, value)
        model = cls(config)
        model.load_state_dict_any(_load_weights(source, revision, cache_dir, resolve_file), strict=strict,
                                  source=str(source))
        dtype = dtype or torch_dtype
        if dtype is not None and dtype != "auto":
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()
