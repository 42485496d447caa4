"""The one checkpoint format of the project (segmentation and registration networks alike): a self-describing
dict of plain data (kind, format, config, tensors), saved with torch.save and loaded with `weights_only=True`,
so that a checkpoint carrying code is refused without running it."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from imaging.errors import BundleError


def save_checkpoint(path: str | Path, kind: str, format: int, module: torch.nn.Module, **fields) -> None:
    """`fields` must be plain data (str, numbers, lists, dicts); the module's weights go in as CPU tensors."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save({"format": format, "kind": kind, **fields, "state_dict": state}, path)


def load_checkpoint(path: str | Path, kind: str, format: int) -> dict:
    """The checkpoint's dict, or BundleError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: {kind} checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or ckpt.get("format") != format:
        found = (ckpt.get("kind"), ckpt.get("format")) if isinstance(ckpt, dict) else (type(ckpt).__name__, None)
        raise BundleError(f"{path}: kind {found[0]!r} format {found[1]!r}; expected {kind} format {format}")
    return ckpt


@contextmanager
def describing(path: str | Path):
    """Turns a checkpoint description that this version cannot build (a missing or unknown config field, a
    value its config refuses) into BundleError naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise BundleError(f"{path}: its description does not fit this version of the code ({exc})") from exc


def load_weights(module: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """Strict state loading: every weight present and of its shape, or BundleError."""
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, RuntimeError) as exc:
        raise BundleError(f"{path}: its weights do not fit the network it describes ({exc})") from exc
