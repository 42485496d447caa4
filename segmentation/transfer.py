"""Transfer learning between networks of different tasks: copy the weights that fit from another model's network,
whatever its organ, modality or number of labels, and leave the rest (the input layer when the channels differ, the
output layer always) as newly initialised.

The segmentation network is MONAI's UNet, built recursively as Sequential(down, SkipConnection(next level), up)
with the bottom layer innermost; so a parameter's path says where it sits: `model.0.*` is the first encoder block,
`model.2.*` the output block (a new task always gets a new one), `model.1.submodule.` descends one level.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

HEAD = "model.2."  # the UNet's last up-sampling block, which maps to the labels


@dataclass
class TransferReport:
    copied: list[str] = field(default_factory=list)
    new: dict[str, str] = field(default_factory=dict)  # name -> why it was not copied

    def summary(self) -> dict:
        return {"copied": len(self.copied), "new": len(self.new),
                "new_tensors": self.new if len(self.new) <= 24 else dict(list(self.new.items())[:24])}


def copy_fitting(target: torch.nn.Module, source_state: dict[str, torch.Tensor],
                 fresh_prefixes: tuple[str, ...] = ()) -> TransferReport:
    """Copy into `target` every tensor of `source_state` with the same name and shape, except those under
    `fresh_prefixes`; returns what was copied and, for each tensor left as initialised, why."""
    report = TransferReport()
    state = target.state_dict()
    for name, tensor in state.items():
        theirs = source_state.get(name)
        if name.startswith(fresh_prefixes):
            report.new[name] = "output layer (a new task)"
        elif theirs is None:
            report.new[name] = "absent from the source"
        elif tuple(theirs.shape) != tuple(tensor.shape):
            report.new[name] = f"shape {tuple(theirs.shape)} in the source, {tuple(tensor.shape)} here"
        else:
            state[name] = theirs.to(tensor.dtype)
            report.copied.append(name)
    target.load_state_dict(state, strict=True)
    return report


def single_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to transfer from a network: its own, or an ensemble's first member's."""
    members = getattr(net, "members", None)
    return (members[0] if members is not None else net).state_dict()


def encoder_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of a MONAI UNet's contracting path and bottom layer (see the module's docstring), of every
    member of an ensemble."""
    out = []
    for name, param in net.named_parameters():
        rest = re.sub(r"^(members\.\d+\.)?model\.", "", name)
        while rest.startswith("1.submodule."):
            rest = rest[len("1.submodule."):]
        if not rest.startswith("2."):
            out.append(param)
    return out
