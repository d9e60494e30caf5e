"""Models built without a random initialisation, for the loaders, which overwrite every tensor anyway.

Built under ``torch.device("meta")`` a model has shapes but no storage, and ``to_empty`` then gives it
uninitialised memory on the real device: no time goes into an init that loading would throw away. One
catch: ``nn.Embedding`` initialises itself with ``normal_``, and on the meta device that call imports torch's
compiler stack (``torch._dynamo``, about a second of a script's start on a CPU). Its init is skipped while
the model is built; nothing else in torch.nn does this.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def empty_model(build: Callable[[], nn.Module], device: str | torch.device | None = None) -> nn.Module:
    """``build()`` (a constructor call) on the meta device, then uninitialised storage on ``device`` (CPU)."""
    embedding_init = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            model = build()
    finally:
        nn.Embedding.reset_parameters = embedding_init
    return model.to_empty(device=device or "cpu")
