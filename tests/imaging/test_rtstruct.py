"""RTSTRUCT export: one ROI per label with its code and colour, contours referenced to the source slices (or
frames), reading back onto exactly the voxels of the label map, and passing dciodvfy."""
import glob
import os
import subprocess

import numpy as np
import pydicom
import pytest

from imaging.errors import InputError
from imaging.io import read_image
from imaging.rtstruct import read_rtstruct_labels, write_rtstruct

CT5N = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "dicomdirtests", "98892001", "CT5N")
NAMES = {0: "background", 1: "Brainstem", 2: "RightParotid", 3: "Anterior"}


def _labels(shape):
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[(y - 8) ** 2 + (x - 8) ** 2 < 20] = 1
    labels[(y - 8) ** 2 + (x - 8) ** 2 < 5] = 2  # a hole in label 1, filled by label 2
    labels[1:3, 12:15, 1:4] = 3
    labels[4, 0, 0] = 3  # a single voxel in a corner
    return labels


def _errors(path):
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_rtstruct_reads_back_onto_the_same_voxels_with_codes_colours_and_references(tmp_path):
    volume = read_image(CT5N)
    labels = _labels(volume.array.shape)
    path = write_rtstruct(labels, volume, NAMES, tmp_path / "rt.dcm", software_version="t")
    back = read_rtstruct_labels(path, volume)
    for value, name in NAMES.items():
        if value:
            np.testing.assert_array_equal(back[name], labels == value, err_msg=name)
    ds = pydicom.dcmread(path)
    source = pydicom.dcmread(sorted(glob.glob(CT5N + "/*"))[0])
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.StructureSetROISequence[1].ROIName == "RightParotid"
    referenced = {ref.ReferencedSOPInstanceUID for c in ds.ROIContourSequence for item in c.ContourSequence
                  for ref in item.ContourImageSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in glob.glob(CT5N + "/*")}
    observations = ds.RTROIObservationsSequence
    assert observations[1].RTROIIdentificationCodeSequence[0].CodeValue == "45289007"  # parotid gland
    assert "RTROIIdentificationCodeSequence" not in observations[2]  # "Anterior": no known concept
    assert len({tuple(c.ROIDisplayColor) for c in ds.ROIContourSequence}) == 3


def _enhanced(folder):
    """CT5N's slices as one legacy-converted enhanced CT object, saved in `folder`/mf: the object and its volume."""
    import highdicom as hd

    slices = sorted((pydicom.dcmread(f) for f in glob.glob(CT5N + "/*")),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(slices, series_instance_uid=hd.UID(), series_number=2,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    (folder / "mf").mkdir()
    mf.save_as(folder / "mf" / "ct.dcm")
    return mf, read_image(folder / "mf")


@pytest.mark.dicom_peer("dciodvfy")
def test_rtstruct_passes_dciodvfy_and_the_check_can_fail(tmp_path):
    """The RTSTRUCTs of the tests above, of a series and of an enhanced CT's frames, pass; a broken one does not."""
    volume = read_image(CT5N)
    path = write_rtstruct(_labels(volume.array.shape), volume, NAMES, tmp_path / "rt.dcm", software_version="t")
    assert _errors(path) == []
    _, enhanced = _enhanced(tmp_path)
    assert _errors(write_rtstruct(_labels(enhanced.array.shape), enhanced, NAMES, tmp_path / "mf.dcm",
                                  software_version="t")) == []
    broken = pydicom.dcmread(path)
    del broken.StructureSetROISequence[0].ROIName
    broken.save_as(tmp_path / "broken.dcm")
    assert _errors(tmp_path / "broken.dcm")


def test_rtstruct_of_an_enhanced_ct_references_frames(tmp_path):
    mf, volume = _enhanced(tmp_path)
    labels = _labels(volume.array.shape)
    path = write_rtstruct(labels, volume, NAMES, tmp_path / "rt.dcm", software_version="t")
    back = read_rtstruct_labels(path, volume)
    np.testing.assert_array_equal(back["Brainstem"], labels == 1)
    ds = pydicom.dcmread(path)
    frames = {(ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber))
              for item in ds.ROIContourSequence[0].ContourSequence for ref in item.ContourImageSequence}
    assert frames == {(mf.SOPInstanceUID, k) for k in range(1, 6)}


def test_rtstruct_needs_a_dicom_source(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, 4, sitk.sitkInt16), str(tmp_path / "a.nii.gz"))
    volume = read_image(tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match=r"no RTSTRUCT: the input was not DICOM \(nifti\)"):
        write_rtstruct(np.zeros(volume.array.shape, np.uint8), volume, NAMES, tmp_path / "rt.dcm",
                       software_version="t")
