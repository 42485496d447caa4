"""RTSTRUCT export for inputs that came in as a DICOM series: what radiotherapy planning systems read.

Written with pydicom, by hand: highdicom writes SEG but not RTSTRUCT, and rt-utils (the common RTSTRUCT library)
pulls in OpenCV for its contouring and cannot take our coded concepts. One ROI per label, with the label's colour
and SNOMED CT code (`imaging.codes`); one closed planar contour per connected outline of the label on each
slice of the source series, traced at the 0.5 level between voxel centres (scikit-image's marching squares),
placed in patient coordinates through the series' geometry and referenced to the slice (or frame) it lies on.
Holes come out as inner contours: readers fill with the even-odd rule (`read_rtstruct_labels` does)."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from imaging.codes import SegmentCode, segment_codes
from imaging.dicomseg import export_problem
from imaging.errors import InputError
from imaging.files import atomic_write
from imaging.io import Geometry, Volume

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
           "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
           "PositionReferenceIndicator")


def _slice_references(source: Volume) -> list[tuple[str, str, int | None]]:
    """For each slice k of the volume: (SOP class, SOP instance, frame number or None) of the image it lies on."""
    headers = source.dicom_headers
    origin, matrix = _affine(source.geometry)
    origins = origin + np.outer(np.arange(source.array.shape[0]), matrix[:, 2])
    if len(headers) == 1 and int(headers[0].get("NumberOfFrames", 1) or 1) > 1:  # enhanced: frames of one object
        h = headers[0]
        positions = np.array([np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
                              for f in h.PerFrameFunctionalGroupsSequence])
        return [(h.SOPClassUID, h.SOPInstanceUID, int(np.argmin(np.linalg.norm(positions - o, axis=1))) + 1)
                for o in origins]
    positions = np.array([np.asarray(h.ImagePositionPatient, float) for h in headers])
    nearest = [int(np.argmin(np.linalg.norm(positions - o, axis=1))) for o in origins]
    return [(headers[i].SOPClassUID, headers[i].SOPInstanceUID, None) for i in nearest]


def _affine(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(origin, matrix) with patient point = origin + matrix @ (x, y, z) continuous voxel index."""
    matrix = np.asarray(geometry.direction, float).reshape(3, 3) * np.asarray(geometry.spacing, float)
    return np.asarray(geometry.origin, float), matrix


def _code_item(code: tuple[str, str, str]):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = code
    return item


def write_rtstruct(labels: np.ndarray, source: Volume, label_names: dict[int, str], path: str | os.PathLike, *,
                   software_version: str, codes: dict[int, SegmentCode] | None = None,
                   label: str = "ISL refined") -> Path:
    """Write a label map on `source`'s grid as an RT Structure Set referencing the source series."""
    import pydicom

    if problem := export_problem(source):
        raise InputError(f"{source.source}: no RTSTRUCT: {problem}")
    if labels.shape != source.array.shape:
        raise InputError(f"label map shape {labels.shape} differs from the source series {source.array.shape}")
    codes = codes or segment_codes(label_names)
    refs = _slice_references(source)
    ds = _structure_set(source, software_version, label)
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(source, refs)]
    rois, contours, observations = [], [], []
    for number, value in enumerate(sorted(v for v in label_names if v != 0), start=1):
        rois.append(_roi(number, label_names[value], source.dicom_headers[0].FrameOfReferenceUID))
        contours.append(_roi_contour(number, labels == value, codes[value], refs, source.geometry))
        observations.append(_observation(number, codes[value]))
    ds.StructureSetROISequence, ds.ROIContourSequence = rois, contours
    ds.RTROIObservationsSequence = observations
    return atomic_write(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))


def _structure_set(source: Volume, software_version: str, label: str):
    """The RT Structure Set's file meta, patient and study (copied from the source series) and its own identity."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    first = source.dicom_headers[0]
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RT_STRUCTURE_SET_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in _COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 9002
    ds.SeriesDescription, ds.OperatorsName = f"{label} structures", ""
    ds.Manufacturer, ds.ManufacturerModelName = "isl-refine", "inference-specific learning"
    ds.SoftwareVersions = software_version
    ds.StructureSetLabel, ds.StructureSetName = label[:16], label[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    return ds


def _referenced_frame(source: Volume, refs):
    """The frame of reference, study and series the contours lie on, with every referenced image."""
    from pydicom.dataset import Dataset

    first = source.dicom_headers[0]
    contour_images = []
    for sop_class, sop_instance, frame in dict.fromkeys(refs):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        if frame is not None:
            item.ReferencedFrameNumber = frame
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = first.SeriesInstanceUID, contour_images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as DICOM's examples)
    study.ReferencedSOPInstanceUID, study.RTReferencedSeriesSequence = first.StudyInstanceUID, [series]
    reference = Dataset()
    reference.FrameOfReferenceUID, reference.RTReferencedStudySequence = first.FrameOfReferenceUID, [study]
    return reference


def _roi(number: int, name: str, frame_of_reference: str):
    from pydicom.dataset import Dataset

    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, frame_of_reference
    roi.ROIName, roi.ROIGenerationAlgorithm = name[:64], "AUTOMATIC"
    return roi


def _roi_contour(number: int, mask: np.ndarray, code: SegmentCode, refs, geometry):
    """One structure's closed planar contours, slice by slice (marching squares on the padded slice), in patient
    coordinates, each referencing its image."""
    from pydicom.dataset import Dataset
    from skimage.measure import find_contours

    origin, matrix = _affine(geometry)
    items = []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        padded = np.pad(mask[k], 1).astype(np.float32)
        for line in find_contours(padded, 0.5):
            rc = line[:-1] - 1.0  # closed: the last point repeats the first; undo the padding
            xyz = np.column_stack([rc[:, 1], rc[:, 0], np.full(len(rc), float(k))])
            points = origin + xyz @ matrix.T
            item = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = refs[k][:2]
            if refs[k][2] is not None:
                ref.ReferencedFrameNumber = refs[k][2]
            item.ContourImageSequence = [ref]
            item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            item.ContourData = [round(float(v), 4) for v in points.ravel()]
            items.append(item)
    contour = Dataset()
    contour.ReferencedROINumber, contour.ROIDisplayColor = number, list(code.colour)
    if items:
        contour.ContourSequence = items
    return contour


def _observation(number: int, code: SegmentCode):
    from pydicom.dataset import Dataset

    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    observation.RTROIInterpretedType = "ORGAN" if code.category[2] == "Anatomical Structure" else ""
    observation.ROIInterpreter = ""
    if code.coded:
        observation.RTROIIdentificationCodeSequence = [_code_item(code.type)]
    return observation


def read_rtstruct_labels(path: str | os.PathLike, source: Volume) -> dict[str, np.ndarray]:
    """ROI name -> boolean mask on `source`'s grid, from an RTSTRUCT's contours (even-odd fill per slice)."""
    import pydicom
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    origin, matrix = _affine(source.geometry)
    inverse = np.linalg.inv(matrix)
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    out = {}
    for contour in ds.ROIContourSequence:
        mask = np.zeros(source.array.shape, bool)
        for item in contour.get("ContourSequence", []):
            xyz = np.asarray(item.ContourData, float).reshape(-1, 3)
            idx = (xyz - origin) @ inverse.T  # continuous (x, y, z) voxel indices
            k = int(round(idx[0, 2]))
            rr, cc = polygon(idx[:, 1], idx[:, 0], shape=mask.shape[1:])
            mask[k, rr, cc] ^= True
        out[names[contour.ReferencedROINumber]] = mask
    return out
