import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ISL_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_NEED = f"the real data of {SHARED} (the project's CI has it, a clone does not; ISL_SHARED_DATA names another)"


def _program(name: str):
    return lambda: shutil.which(name) is not None


# What a test may need from outside Python: how to tell it is here, and the Debian package that brings it.
THINGS = {
    "redis-server": (_program("redis-server"), "redis-server"),
    "PostgreSQL": (lambda: any(Path("/usr/lib/postgresql").glob("*/bin/initdb")), "postgresql"),
    "Orthanc": (_program("Orthanc"), "orthanc"),
    "Orthanc's DICOMweb plugin": (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists, "orthanc-dicomweb"),
    "storescu": (_program("storescu"), "dcmtk"),
    "dciodvfy": (_program("dciodvfy"), "dicom3tools"),
    "chromium": (_program("chromium"), "chromium"),
    "chromedriver": (_program("chromedriver"), "chromium-driver"),
    "docker-compose": (_program("docker-compose"), "docker-compose"),
}
# The need markers (registered in pyproject.toml) and what each needs; `dicom_peer("dciodvfy")` names the peers a test
# uses, when not all. `gpu` and `shared_data` are checked apart.
NEEDS = {"redis": ("redis-server",), "postgres": ("PostgreSQL",),
         "dicom_peer": ("Orthanc", "Orthanc's DICOMweb plugin", "storescu", "dciodvfy"),
         "browser": ("chromium", "chromedriver"), "compose": ("docker-compose",)}
# conftest's fixtures and what using them needs: the markers follow the fixture, at any depth (a test module may have
# a FIXTURE_NEEDS of its own, for its own fixtures, its values markers or their names)
FIXTURE_NEEDS = {"redis_url": ("redis",), "stack": ("redis", "subprocess"), "tiny_bundle": ("trains",),
                 "hippocampus": ("shared_data",), "brats_multiseq": ("shared_data",), "spinalcord": ("shared_data",)}
# a test with none of these is `fast`: it needs nothing outside Python, starts no process and trains no network
NOT_FAST = (*NEEDS, "gpu", "shared_data", "subprocess", "trains", "slow")


@functools.cache
def _here(thing: str) -> bool:
    if thing == "a CUDA GPU":
        import torch

        return torch.cuda.is_available()
    return THINGS[thing][0]()


def _absent(marker: pytest.Mark) -> list[str]:
    """What the need `marker` names and this machine lacks, each with how to get it."""
    if marker.name == "shared_data":
        return [] if SHARED.is_dir() else [SHARED_NEED]
    if marker.name == "gpu":
        return [] if _here("a CUDA GPU") else ["a CUDA GPU (torch sees none)"]
    if marker.name not in NEEDS:
        return []
    return [f"{t} (Debian package {THINGS[t][1]})" for t in marker.args or NEEDS[marker.name] if not _here(t)]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Each test's needs, from its markers and from conftest's fixtures it uses: a need this machine cannot meet is a
    skip that says what is missing and how to get it; a test with none of NOT_FAST is `fast` (README: the fast tier
    runs first)."""
    for item in items:
        needs = FIXTURE_NEEDS | getattr(getattr(item, "module", None), "FIXTURE_NEEDS", {})
        for marker in (m for f in getattr(item, "fixturenames", ()) for m in needs.get(f, ())):
            item.add_marker(marker)
        missing = dict.fromkeys(thing for marker in item.iter_markers() for thing in _absent(marker))
        if missing:
            debian = "; .ci/run installs the Debian packages" if any("Debian package" in m for m in missing) else ""
            item.add_marker(pytest.mark.skip(reason="needs " + "; ".join(missing) + debian))
        if not any(item.get_closest_marker(m) for m in NOT_FAST):
            item.add_marker("fast")


def shared(sub: str) -> Path:
    """A folder of ../shared/data, or skip with the reason when this checkout has none (a fresh clone)."""
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"needs {SHARED_NEED}" if not SHARED.is_dir() else f"real data {path} is absent")
    return path


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    return shared("hippocampus")


@pytest.fixture(scope="session")
def brats_multiseq() -> Path:
    return shared("brats_multiseq")


@pytest.fixture(scope="session")
def spinalcord() -> Path:
    return shared("spinalcord")


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A small seeded phantom dataset in MSD layout (2 held-out cases first, then 6 training cases)."""
    from worker.demo import make_dataset

    root = tmp_path_factory.mktemp("phantoms")
    make_dataset(root, n_train=6, n_test=2, seed=1)
    return root


@pytest.fixture(scope="session")
def two_sequence_dataset(phantom_dataset, tmp_path_factory) -> Path:
    """The phantoms as another task: two MR sequences and one merged structure. The second sequence (the image's
    inverse) was acquired on another grid: 1.25 mm voxels, turned 6 degrees and shifted 3 mm, as a patient moves
    between sequences."""
    import json
    import math

    import SimpleITK as sitk

    dst = tmp_path_factory.mktemp("two_sequences")
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir()
    for lab_path in sorted((phantom_dataset / "labelsTr").glob("*.nii.gz")):
        case = lab_path.name[: -len(".nii.gz")]
        image = sitk.ReadImage(str(phantom_dataset / "imagesTr" / lab_path.name))
        sitk.WriteImage(image, str(dst / "imagesTr" / f"{case}_0000.nii.gz"))
        motion = sitk.Euler3DTransform()
        motion.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
        motion.SetRotation(0.0, math.radians(3), math.radians(6))
        motion.SetTranslation((3.0, -2.0, 1.0))
        grid = sitk.Image([round(n / 1.25) for n in image.GetSize()], sitk.sitkFloat32)
        grid.SetSpacing((1.25, 1.25, 1.25))
        grid.SetOrigin(image.GetOrigin())
        inverse = 200.0 - sitk.Cast(image, sitk.sitkFloat32)
        sitk.WriteImage(sitk.Resample(inverse, grid, motion, sitk.sitkLinear, 200.0),
                        str(dst / "imagesTr" / f"{case}_0001.nii.gz"))
        whole = sitk.Cast(sitk.ReadImage(str(lab_path)) > 0, sitk.sitkUInt8)
        sitk.WriteImage(whole, str(dst / "labelsTr" / lab_path.name))
    (dst / "dataset.json").write_text(json.dumps({"name": "Inverse", "channel_names": {"0": "T1", "1": "T2"},
                                                  "labels": {"background": 0, "whole": 1}, "file_ending": ".nii.gz"}))
    return dst


@pytest.fixture(scope="session")
def tiny_bundle(phantom_dataset, tmp_path_factory) -> Path:
    """A bundle trained for a few iterations on the phantoms, refining with ISL on a test's scale (every stage, fewer
    atlases and steps: worker/demo.py QUICK_REFINEMENT): exercises every code path in seconds."""
    from worker.demo import QUICK_REFINEMENT, train_tiny_bundle

    return train_tiny_bundle(phantom_dataset, tmp_path_factory.mktemp("bundle") / "tiny", QUICK_REFINEMENT)


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of its own, with no worker sweeping it: the job-store tests drive every step."""
    from kit import private_redis

    with private_redis(tmp_path) as url:
        yield url


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def stack(tiny_bundle, phantom_dataset, tmp_path_factory):
    """The service as subprocesses (worker/localstack.py): a private redis-server on a free port, `isl serve`
    and one `isl worker`, shared by the modules that test the service over HTTP."""
    from kit import KEYS

    from worker.localstack import LocalStack

    with LocalStack(tmp_path_factory.mktemp("stack"), tiny_bundle.parent, tiny_bundle.name, phantom_dataset, KEYS,
                    # the security tests send hundreds of bad keys on purpose: the throttle is test_hardening.py's
                    extra_env={"ISL_CONSOLE_OPERATORS": "alpha", "ISL_AUTH_FAILURES": "100000"}) as s:
        try:
            yield s
        finally:
            print(s.logs())
