"""Series that are not textbook, made from a real CT series (pydicom's CT5N, 5 slices): each either reads onto the
right voxels or is refused before anything is queued, with a reason a person can act on."""
import glob
import os
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from imaging.errors import CorruptImageError, UnsupportedImageError
from imaging.io import read_image

CT5N = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "dicomdirtests", "98892001", "CT5N")


def _slices():
    return sorted((pydicom.dcmread(f) for f in glob.glob(CT5N + "/*")), key=lambda d: float(d.ImagePositionPatient[2]))


def _write(folder, datasets):
    folder.mkdir()
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm")
    return folder


def test_a_series_with_slices_of_two_orientations_is_refused(tmp_path):
    slices = _slices()
    slices[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice among axial ones
    with pytest.raises(UnsupportedImageError, match="not all parallel .*1 of 5 differ.*one series per orientation"):
        read_image(_write(tmp_path / "s", slices))


def test_a_gantry_tilted_series_is_refused_and_says_the_angle(tmp_path):
    slices = _slices()
    for i, ds in enumerate(slices):  # each slice 0.87 mm further along y per 2.5 mm along z: about 19 degrees
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.87 * i, z]
    with pytest.raises(UnsupportedImageError, match=r"gantry tilt of about 19\.\d degrees"):
        read_image(_write(tmp_path / "s", slices))


def test_a_missing_slice_is_refused(tmp_path):
    slices = _slices()
    del slices[2]
    with pytest.raises(CorruptImageError, match="a slice is missing or duplicated"):
        read_image(_write(tmp_path / "s", slices))


def _enhanced(tmp_path):
    import highdicom as hd

    mf = hd.legacy.LegacyConvertedEnhancedCTImage(_slices(), series_instance_uid=hd.UID(), series_number=2,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "ct.dcm")
    return tmp_path / "mf", mf


def test_an_enhanced_multiframe_ct_reads_onto_the_same_voxels_as_its_slices(tmp_path):
    folder, _ = _enhanced(tmp_path)
    frames, series = read_image(folder), read_image(CT5N)
    assert frames.kind == "dicom" and frames.array.shape == series.array.shape

    def lps(v):
        return sitk.DICOMOrient(v.geometry.image_from_array(v.array.astype(np.float32)), "LPS")

    a, b = lps(frames), lps(series)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.dicom_peer("dciodvfy")
def test_a_seg_of_an_enhanced_ct_references_its_frames_and_passes_dciodvfy(tmp_path):
    import highdicom as hd

    from imaging.dicomseg import write_dicom_seg

    folder, mf = _enhanced(tmp_path)
    volume = read_image(folder)
    labels = (volume.array > np.median(volume.array)).astype(np.uint8)
    path = write_dicom_seg(labels, volume, {0: "background", 1: "Brainstem"}, tmp_path / "seg.dcm",
                           software_version="t")
    seg = hd.seg.segread(path)
    assert {ref[2] for ref in seg.get_source_image_uids()} == {mf.SOPInstanceUID}
    # each SEG frame lies on the plane of the volume slice it was cut from
    image = volume.geometry.image_from_array(volume.array.astype(np.float32))
    expected = [image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(volume.array.shape[0])]
    written = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
               for f in seg.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(written, expected, atol=1e-2)
    np.testing.assert_array_equal(seg.pixel_array.reshape(labels.shape), labels)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_a_multiframe_object_without_frame_geometry_is_refused(tmp_path):
    _, mf = _enhanced(tmp_path)
    del mf.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    (tmp_path / "bad").mkdir()
    mf.save_as(tmp_path / "bad" / "ct.dcm")
    with pytest.raises(UnsupportedImageError, match="frame 2 has no plane position"):
        read_image(tmp_path / "bad")
