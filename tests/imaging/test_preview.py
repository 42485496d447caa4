"""Preview images: the slices a person looks at show the scan as a radiologist reads it, with each mask's outline
in its colour, whatever the orientation of the scan's grid."""
import json

import numpy as np
import SimpleITK as sitk
from PIL import Image

from imaging.io import Geometry
from imaging.preview import BASELINE, REFINED, render_previews


def _scan(direction):
    """A 20 x 30 x 40 (x, y, z) grid at 1 x 1 x 2 mm; a bright block on the patient's left, superior half."""
    image = sitk.Image([20, 30, 40], sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetDirection(direction)
    arr = np.full((40, 30, 20), 10.0, np.float32)
    return image, arr


def test_slices_are_shown_in_lps_at_their_physical_aspect_with_both_outlines(tmp_path):
    image, arr = _scan((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS already: x to the patient's left
    refined = np.zeros(arr.shape, np.uint8)
    refined[24:36, 10:20, 12:18] = 1  # superior (high z), patient's left (high x)
    baseline = np.zeros_like(refined)
    baseline[26:34, 11:19, 13:17] = 1
    arr[refined > 0] = 100
    index = render_previews(arr, baseline, refined, Geometry.of(image), tmp_path)
    assert index["colours"] == {"baseline": "#ff9f1c", "refined": "#00e5ff"}
    axial = index["planes"]["axial"]
    assert 1 < len(axial) <= 24 and all(20 <= s["index"] <= 39 for s in axial)  # around the masks only
    middle = np.asarray(Image.open(tmp_path / axial[len(axial) // 2]["file"]))
    assert middle.shape[:2] == (320, round(320 * 20 / 30))  # 30 mm rows by 20 mm columns
    cols = np.flatnonzero((middle == REFINED).all(-1).any(0))
    assert cols.min() > middle.shape[1] / 2  # the patient's left is on the right of the image
    assert (middle == BASELINE).all(-1).any()
    slices = index["planes"]["coronal"]
    coronal = np.asarray(Image.open(tmp_path / slices[len(slices) // 2]["file"]))
    assert coronal.shape[:2] == (320, round(320 * 20 / 80))  # 80 mm tall (40 slices of 2 mm), 20 mm wide
    rows = np.flatnonzero((coronal == REFINED).all(-1).any(1))
    assert rows.max() < coronal.shape[0] / 2  # superior is up
    assert json.loads((tmp_path / "preview.json").read_text()) == index


def test_a_grid_of_another_orientation_is_shown_the_same_way(tmp_path):
    """The same anatomy stored with x running to the patient's right gives the same pictures."""
    image, arr = _scan((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    image.SetOrigin((19.0, 0.0, 0.0))  # the same physical extent as the LPS grid above
    refined = np.zeros(arr.shape, np.uint8)
    refined[24:36, 10:20, 2:8] = 1  # the patient's left is now at low x
    index = render_previews(arr, refined, refined, Geometry.of(image), tmp_path)
    axial = np.asarray(Image.open(tmp_path / index["planes"]["axial"][len(index["planes"]["axial"]) // 2]["file"]))
    cols = np.flatnonzero((axial == REFINED).all(-1).any(0))
    assert cols.min() > axial.shape[1] / 2


def test_empty_masks_show_the_whole_scan(tmp_path):
    image, arr = _scan((1, 0, 0, 0, 1, 0, 0, 0, 1))
    empty = np.zeros(arr.shape, np.uint8)
    index = render_previews(arr, empty, empty, Geometry.of(image), tmp_path)
    ks = [s["index"] for s in index["planes"]["axial"]]
    assert len(ks) == 24 and ks[0] == 0 and ks[-1] == 39
