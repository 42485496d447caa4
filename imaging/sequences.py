"""Multi-sequence input: the sequences (channels) of one case on the first one's grid.

A sequence on the first one's grid is taken as it is (the MSD / nnU-Net layout's own rule: channels are
co-registered). A sequence on another grid is rigidly co-registered to the first, then resampled onto its grid:
SimpleITK's Euler 3D transform, Mattes mutual information (the sequences' contrasts differ), three resolutions,
starting from the scanners' own coordinates (sequences of one study share them; the registration corrects the motion
between acquisitions). The quality of each alignment (mutual information before and after, how far it moved, how
much of the first sequence's field of view the other covers) goes into the report. A sequence whose field of view
hardly meets the first's is refused: it is not a sequence of the same study and region.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging.errors import GeometryMismatchError, InputError
from imaging.io import Geometry, ReadLimits, Volume, read_image

MIN_OVERLAP = 0.5  # share of the first sequence's field of view that another must cover, in the scanner's coordinates
SUSPECT_MM, SUSPECT_DEG = 20.0, 15.0  # an alignment that moved more than this is flagged in the QA


def _coverage(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Share of the fixed grid's voxels that `transform` maps inside the moving image's field of view."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(inside).mean())


def _method(fixed: sitk.Image, seed: int) -> sitk.ImageRegistrationMethod:
    """Mattes MI on about 100k sampled voxels (all of a small image), over the resolutions that keep at least 24
    voxels along every axis (4x, 2x, full), by steps of at most 1 mm."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)  # the same result in every run (the sampled metric's sums depend on the threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(np.clip(1e5 / np.prod(fixed.GetSize()), 0.02, 1.0)), seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = [f for f in (4, 2) if min(fixed.GetSize()) / f >= 24] + [1]
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([f / 2 for f in shrink[:-1]] + [0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def coregister(fixed: Volume, moving: Volume, what: str, seed: int = 0) -> tuple[Volume, dict]:
    """`moving` rigidly aligned to `fixed` and resampled onto its grid, with the alignment's quality; or
    GeometryMismatchError naming `what` when its field of view hardly meets the fixed one's."""
    t0 = time.perf_counter()
    f, m = (sitk.Cast(v.to_sitk(), sitk.sitkFloat32) for v in (fixed, moving))
    identity = sitk.Euler3DTransform()
    identity.SetCenter(f.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in f.GetSize()]))
    before = _coverage(f, m, identity)
    if before < MIN_OVERLAP:
        raise GeometryMismatchError(f"{what}: covers {before:.0%} of the first sequence's field of view in the "
                                    f"scanner's coordinates (at least {MIN_OVERLAP:.0%} needed): the sequences of a "
                                    "case must image the same region in one study")
    reg = _method(f, seed)
    reg.SetInitialTransform(identity, inPlace=False)
    mi_before = -reg.MetricEvaluate(f, m)
    try:
        transform = reg.Execute(f, m)
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform).GetNthTransform(0)
        check = _method(f, seed)
        check.SetInitialTransform(transform, inPlace=False)
        mi_after = -check.MetricEvaluate(f, m)
    except RuntimeError:  # ITK: the optimiser moved the sequence off the first one's field of view
        transform, mi_after = identity, -np.inf
    kept = mi_after <= mi_before  # the optimiser found nothing better than the scanners' own alignment: keep it
    if kept:
        transform, mi_after = identity, mi_before
    params = sitk.Euler3DTransform(transform).GetParameters()
    rotation = math.degrees(float(np.linalg.norm(params[:3])))
    translation = float(np.linalg.norm(params[3:6]))
    resampled = sitk.Resample(m, f, transform, sitk.sitkLinear, float(np.min(moving.array)), sitk.sitkFloat32)
    quality = {"sequence": what, "method": "rigid (Euler 3D, Mattes mutual information)" + (
        "; it did not improve on the scanners' alignment, which was kept" if kept else ""),
               "mutual_information_before": round(float(mi_before), 4),
               "mutual_information_after": round(float(mi_after), 4),
               "rotation_deg": round(rotation, 2), "translation_mm": round(translation, 2),
               "coverage": round(_coverage(f, m, transform), 4), "iterations": reg.GetOptimizerIteration(),
               "stop": reg.GetOptimizerStopConditionDescription(), "seconds": round(time.perf_counter() - t0, 2)}
    quality["suspect"] = bool(kept or rotation > SUSPECT_DEG or translation > SUSPECT_MM)
    out = Volume(sitk.GetArrayFromImage(resampled).astype(np.float32), Geometry.of(resampled),
                 moving.source, moving.kind, moving.dicom_headers)
    return out, quality


def on_first_grid(volumes: list[Volume], names: list[str] | None = None) -> tuple[list[Volume], list[dict]]:
    """The sequences with every one on the first one's grid (co-registered where it was not), and one QA record per
    sequence after the first."""
    names = names or [f"channel {i}" for i in range(len(volumes))]
    out, qa = [volumes[0]], []
    for i, v in enumerate(volumes[1:], start=1):
        what = f"sequence {i} ({names[i]}, {v.source})"
        try:
            volumes[0].geometry.check_same(v.geometry, what)
        except GeometryMismatchError:
            aligned, quality = coregister(volumes[0], v, what)
            out.append(aligned)
            qa.append(quality)
            continue
        out.append(v)
        qa.append({"sequence": what, "method": "same grid as the first sequence (taken as co-registered)"})
    return out, qa


def read_sequences(inputs: list[Path], series_uid: str | None = None, channels: list[str] | None = None,
                   sequence_series: dict[str, str] | None = None) -> tuple[list[Volume], list[dict]]:
    """One volume per sequence (channel), each on the first one's grid (co-registered to it where it was not), and
    the QA of each alignment. `channels`: the model's sequences, in order: one input each,
    or, for a model of several, one DICOM study (folder or zip) whose series are assigned to them by description or by
    `sequence_series` (imaging.dicom.assign_series). A missing or extra sequence is InputError naming them."""
    study = channels is not None and len(channels) > 1 and len(inputs) == 1 and (
        inputs[0].is_dir() or inputs[0].suffix.lower() == ".zip")
    if study:
        from imaging.dicom import read_study  # pydicom, only for a study

        return on_first_grid(read_study(inputs[0], channels, sequence_series, ReadLimits()), channels)
    if sequence_series:
        raise InputError("series are assigned to sequences only in a DICOM study (one folder or zip) given to a model "
                         "of several sequences")
    if channels is not None and len(inputs) != len(channels):
        given = ", ".join(str(p) for p in inputs)
        missing = f"; missing {', '.join(channels[len(inputs):])}" if len(inputs) < len(channels) else ""
        raise InputError(f"the model takes {len(channels)} sequence(s), one file, folder or zip each, in this order: "
                         f"{', '.join(channels)}; {len(inputs)} given ({given}){missing}")
    volumes = [read_image(p, series_uid=series_uid) for p in inputs]
    return on_first_grid(volumes, channels)
