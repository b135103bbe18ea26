"""Model outputs with transformers' semantics: attribute, key and index access; `to_tuple()` drops Nones."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class ModelOutput(OrderedDict):
    _fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        values = dict(zip(self._fields, args))
        values.update(kwargs)
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        for name in self._fields:
            value = values.get(name)
            object.__setattr__(self, name, value)
            if value is not None:
                super().__setitem__(name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in self._fields and value is not None:
            super().__setitem__(name, value)

    def __reduce__(self):
        return type(self), tuple(getattr(self, f) for f in self._fields)

    def to_tuple(self) -> tuple:
        return tuple(super(ModelOutput, self).__getitem__(k) for k in self.keys())


class BaseModelOutputWithPooling(ModelOutput):
    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    _fields = ("last_hidden_state", "pooler_output", "hidden_states")


class ImageClassifierOutput(ModelOutput):
    _fields = ("loss", "logits", "hidden_states", "attentions")


class BackboneOutput(ModelOutput):
    _fields = ("feature_maps", "hidden_states", "attentions")
