"""A corpus of DICOM series that are not textbook, made by the tests from a real volume (a head-and-neck CT of
../shared): the same voxels written as an axial, a sagittal and a coronal acquisition (exact permutations, no
resampling), as one enhanced multi-frame object, with a gantry tilt, with one slice of another orientation, with
a slice missing, as two series in one folder, and without the Frame of Reference a SEG or an RTSTRUCT must
reference. And the checks every DICOM export of the tests passes: dciodvfy without errors, and SEG and RTSTRUCT
reading back onto the NIfTI mask."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# DICOMOrient codes: where the column index, the row index and the slice index point (patient LPS)
ORIENTATIONS = {"axial": "LPS", "sagittal": "PIR", "coronal": "LIP"}


def datasets(image: sitk.Image, orientation: str = "axial", *, study_uid: str, frame_of_reference: str | None,
             tilt_mm: float = 0.0) -> list[FileDataset]:
    """`image` (a CT in HU, any grid) as CT slices acquired in `orientation`; `tilt_mm` shifts each slice that
    far along its columns' direction (a gantry tilt)."""
    image = sitk.DICOMOrient(image, ORIENTATIONS[orientation])
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    d = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    series = generate_uid()
    out = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"{k}", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = "CT", "CORPUS", "Corpus^Hn", \
            "O", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20261203", \
            "120000", "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, k + 1, "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if orientation == "axial" else "OTHER"]
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + tilt_mm * k * d[:, 1]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *array.shape[1:], 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.KVP, ds.PositionReferenceIndicator = "", ""
        ds.PixelData = np.ascontiguousarray(array[k]).tobytes()
        out.append(ds)
    return out


def save(series: list, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for ds in series:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def make_corpus(image: sitk.Image, root: Path) -> dict[str, Path]:
    """Shape name -> DICOM folder, all from `image`."""
    import highdicom as hd

    study, frame = generate_uid(), generate_uid()
    shapes = {o: save(datasets(image, o, study_uid=study, frame_of_reference=frame), root / o) for o in ORIENTATIONS}
    axial = [pydicom.dcmread(p) for p in sorted(shapes["axial"].iterdir())]
    axial.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(axial, series_instance_uid=hd.UID(), series_number=2,
                                                        sop_instance_uid=hd.UID(), instance_number=1)
    (root / "enhanced").mkdir()
    enhanced.save_as(root / "enhanced" / "ct.dcm")
    shapes["enhanced"] = root / "enhanced"
    shapes["gantry_tilt"] = save(datasets(image, study_uid=study, frame_of_reference=frame, tilt_mm=1.0),
                                 root / "gantry_tilt")
    mixed = datasets(image, study_uid=study, frame_of_reference=frame)
    mixed[len(mixed) // 2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # one coronal slice among axial ones
    shapes["mixed_orientation"] = save(mixed, root / "mixed_orientation")
    missing = datasets(image, study_uid=study, frame_of_reference=frame)
    del missing[len(missing) // 2]
    shapes["missing_slice"] = save(missing, root / "missing_slice")
    two = root / "two_series"
    shutil.copytree(shapes["axial"], two)
    save(datasets(image, "coronal", study_uid=study, frame_of_reference=frame), two)
    shapes["two_series"] = two
    shapes["no_frame_of_reference"] = save(datasets(image, study_uid=study, frame_of_reference=None),
                                           root / "no_frame_of_reference")
    return shapes


def series_uids(folder: Path) -> list[str]:
    return sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in folder.iterdir()})


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a DICOM file (Debian's dicom3tools)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def check_exports(seg: Path | None, rtstruct: Path | None, mask: Path, source: Path, names: dict[int, str], *,
                  dciodvfy: bool = True) -> None:
    """The exports given pass dciodvfy (unless told not to: a test that runs it is marked `dicom_peer("dciodvfy")`),
    and each label of each reads back onto exactly the NIfTI mask's voxels on the source series' grid."""
    import highdicom as hd

    from imaging.io import read_image
    from imaging.rtstruct import read_rtstruct_labels

    for path in filter(None, (seg, rtstruct)) if dciodvfy else ():
        assert not dciodvfy_errors(path), (path.name, dciodvfy_errors(path))
    volume = read_image(source)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    assert labels.shape == volume.array.shape
    value = {name: v for v, name in names.items() if v != 0}
    assert set(np.unique(labels)) - {0} <= set(value.values())
    if seg is not None:
        segmentation = hd.seg.segread(seg)
        uids = [h.SOPInstanceUID for h in volume.dicom_headers]
        if len(uids) == 1 and int(volume.dicom_headers[0].get("NumberOfFrames", 1) or 1) > 1:  # enhanced: by frame
            numbers = segmentation.get_pixels_by_source_frame(uids[0], list(range(1, labels.shape[0] + 1)),
                                                              combine_segments=True, skip_overlap_checks=True)
        else:
            numbers = segmentation.get_pixels_by_source_instance(uids, combine_segments=True,
                                                                 skip_overlap_checks=True)
        segments = {segmentation.get_segment_description(n).segment_label: n for n in segmentation.segment_numbers}
        assert set(segments) == set(value), ("SEG segments", sorted(segments), sorted(value))
        for name, n in segments.items():
            np.testing.assert_array_equal(numbers == n, labels == value[name], err_msg=f"SEG {name}")
    if rtstruct is not None:
        rois = read_rtstruct_labels(rtstruct, volume)
        present = {name for name, v in value.items() if (labels == v).any()}
        assert present <= set(rois) <= set(value), ("RTSTRUCT ROIs", sorted(rois), sorted(present))
        for name, voxels in rois.items():
            np.testing.assert_array_equal(voxels, labels == value[name], err_msg=f"RTSTRUCT {name}")
