"""Seconds per named stage, summed over every time the stage is entered. On a GPU the stage's queued kernels are
waited for at both ends, so that each stage is charged with its own work (CUDA runs asynchronously)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        _sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
