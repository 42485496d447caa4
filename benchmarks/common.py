"""What the benchmarks share: their common options, and the provenance that every results file records (the command,
the git commit and whether the tree differed from it, the device, the date). Benchmarks run from the repository
root as modules: `python -m benchmarks.NAME ...` (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = object()  # add_options: the option has no default and must be given
OPTIONS = {
    "model": {"help": "a model bundle folder, e.g. models/headneck_ct"},
    "dataset": {"help": "the dataset folder (imagesTr, labelsTr, dataset.json)"},
    "cases": {"type": int, "help": "the first N validation cases of the bundle"},
    "threads": {"type": int, "help": "torch CPU threads"},
    "device": {"help": "cpu or cuda"},
    "json": {"type": Path, "help": "also write the results to this JSON file"},
}


def add_options(ap: argparse.ArgumentParser, **defaults) -> None:
    """The shared options named, each with its default (REQUIRED: it must be given), e.g.
    `add_options(ap, model=REQUIRED, dataset=REQUIRED, cases=3, threads=2)`."""
    for name, default in defaults.items():
        given = {"required": True} if default is REQUIRED else {"default": default}
        ap.add_argument(f"--{name.replace('_', '-')}", **OPTIONS[name], **given)


def command(argv: list[str] | None = None) -> str:
    """The command that ran this benchmark, as typed from the repository root."""
    argv = sys.argv if argv is None else argv
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else f"python {argv[0]}"
    return " ".join([program, shlex.join(argv[1:])]).rstrip()


def git_state() -> dict:
    """The commit checked out and whether tracked files differ from it (None, None outside a git checkout, e.g. a
    working tree copied to a GPU machine)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device: str | None = None) -> dict:
    """The machine: CPU model and cores, Python, and where torch is loaded (or `device` names a torch device) its
    version, threads, that device and the GPU's name when CUDA is available."""
    out = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "machine": platform.machine(),
           "python": platform.python_version()}
    torch = sys.modules.get("torch")  # a service benchmark that never loaded torch ran on the CPU alone
    if torch is None and device is not None:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        out |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "torch_device": str(device or "cpu")}
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance(device: str | None = None, machine: bool = True) -> dict:
    """Where a result came from: commit, dirty tree, device (`machine` False: a result measured elsewhere, e.g. a
    summary of files a GPU machine wrote, which record their own) and date; the command is stamped beside it."""
    where = {"device": device_info(device)} if machine else {}
    return git_state() | where | {"date": datetime.now(UTC).isoformat(timespec="seconds")}


def stamped(result: dict, device: str | None = None, machine: bool = True) -> dict:
    """`result` headed by the command that made it and its provenance."""
    return {"command": command(), "provenance": provenance(device, machine)} | result


def tiny_model(prefix: str) -> tuple[Path, Path, list[Path]]:
    """For the service benchmarks: a tiny bundle (`tiny`) trained for seconds on seeded phantoms, as in the tests,
    in a new folder; that folder (its models/ holds the bundle), the phantom dataset and its training scans."""
    import tempfile

    from worker.demo import make_dataset, train_tiny_bundle

    work = Path(tempfile.mkdtemp(prefix=prefix))
    data = work / "phantoms"
    make_dataset(data, n_train=6, n_test=2, seed=1)
    train_tiny_bundle(data, work / "models" / "tiny")
    return work, data, sorted((data / "imagesTr").glob("*.nii.gz"))


def emit(result: dict, path: str | Path | None = None, indent: int = 2, default=None) -> None:
    """Print `result` as JSON and, with `path`, write it there too (`default`: as json.dumps's)."""
    text = json.dumps(result, indent=indent, default=default)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
