"""DICOM SEG export with highdicom, for inputs that came in as a DICOM series."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imaging.codes import SegmentCode, segment_codes
from imaging.errors import InputError
from imaging.files import atomic_write
from imaging.io import Volume

# what a SEG or an RTSTRUCT must reference in its source series
_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def export_problem(source: Volume) -> str | None:
    """Why no DICOM SEG or RTSTRUCT can be built for `source` (a sentence), or None when they can: a NIfTI input,
    or a DICOM series whose headers lack an attribute the exports must reference."""
    if source.kind != "dicom" or not source.dicom_headers:
        return f"the input was not DICOM ({source.kind})"
    missing = sorted({k for h in source.dicom_headers for k in _REFERENCED if not h.get(k)})
    if missing:
        return (f"the series' headers lack {', '.join(missing)}, which a DICOM SEG and an RTSTRUCT must reference; "
                "the NIfTI mask is written, the DICOM exports are not")
    return None


def write_dicom_seg(labels: np.ndarray, source: Volume, label_names: dict[int, str], path: str | os.PathLike,
                    *, software_version: str, series_description: str = "ISL refined segmentation",
                    codes: dict[int, SegmentCode] | None = None) -> Path:
    """Write a label map on `source`'s grid as a DICOM SEG that references the source series.

    Each label value present in `label_names` becomes one segment (numbered 1..n in label order), with its coded
    category, type and laterality and its display colour from `codes` (default: imaging.codes by name).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dicom_codes

    if problem := export_problem(source):
        raise InputError(f"{source.source}: no DICOM SEG: {problem}")
    if labels.shape != source.array.shape:
        raise InputError(f"label map shape {labels.shape} differs from the source series {source.array.shape}")
    values = sorted(v for v in label_names if v != 0)
    codes = codes or segment_codes(label_names)
    segment_map = np.zeros(labels.shape, dtype=np.uint16)
    descriptions = []
    for number, value in enumerate(values, start=1):
        segment_map[labels == value] = number
        code = codes[value]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label_names[value][:64],
            segmented_property_category=hd.sr.CodedConcept(*code.category[1::-1], code.category[2]),
            segmented_property_type=hd.sr.CodedConcept(*code.type[1::-1], code.type[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="isl-refine", version=software_version, family=dicom_codes.cid7162.ArtificialIntelligence),
            display_color=hd.color.CIELabColor.from_rgb(*code.colour),
        )
        if code.laterality:  # highdicom takes no type modifier: the Segmented Property Type Modifier Code Sequence
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(*code.laterality[1::-1], code.laterality[2])]
        descriptions.append(description)
    seg = hd.seg.Segmentation(
        source_images=_with_type2_attributes(source.dicom_headers),
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9001,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="isl-refine",
        manufacturer_model_name="inference-specific learning",
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=False,
    )
    return atomic_write(path, lambda tmp: seg.save_as(tmp))


# Patient and study attributes a SEG must carry (type 2: present, possibly empty). Exports that leave them
# out are common; highdicom copies them from the source, so they are added empty to copies of the headers.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def _with_type2_attributes(headers: list) -> list:
    import copy

    out = []
    for ds in headers:
        missing = [k for k in _TYPE2 if k not in ds]
        if missing:
            ds = copy.deepcopy(ds)
            for keyword in missing:
                setattr(ds, keyword, "")
        out.append(ds)
    return out
