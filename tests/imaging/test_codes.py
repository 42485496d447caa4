"""Coded segments: each label's SNOMED CT concept and colour, from its name or the dataset's own map, and what a
DICOM SEG written with them says when read back."""
import json
import os
import subprocess

import numpy as np
import pydicom
import pytest
from dicom_corpus import check_exports

from imaging.codes import segment_code, segment_codes
from imaging.dataset import load_dataset
from imaging.errors import DatasetError
from imaging.io import read_image, write_label_map

CT5N = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "dicomdirtests", "98892001", "CT5N")

HEADNECK = {0: "background", 1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid",
            5: "Esophagus", 6: "Larynx", 7: "Mandible"}


def test_structures_known_by_name_take_their_snomed_codes_and_laterality():
    codes = segment_codes(HEADNECK)
    assert {v: c.type[1] for v, c in codes.items()} == {1: "119238007", 2: "2748008", 3: "45289007",
                                                         4: "45289007", 5: "32849002", 6: "4596009",
                                                         7: "91609006"}
    assert codes[3].laterality[1] == "24028007" and codes[4].laterality[1] == "7771000"  # right, left
    assert codes[1].laterality is None and all(c.coded for c in codes.values())
    assert {c.category[1] for c in codes.values()} == {"91723000"}  # anatomical structure
    assert len({c.colour for c in codes.values()}) == 7  # one colour per segment
    tumour = segment_code(4, "enhancing_tumour")
    assert tumour.category[1] == "49755003" and tumour.type[1] == "108369006"  # abnormal structure, neoplasm
    assert segment_code(1, "spinal cord").type == segment_code(1, "Spinal_Cord").type


def test_a_name_nothing_knows_falls_back_to_tissue_and_says_so():
    code = segment_code(1, "Anterior")
    assert code.type[1] == code.category[1] == "85756007" and not code.coded


def _dataset(root, segment_codes):
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    for d in ("labelsTr", "imagesTr"):
        (root / d / "c1.nii.gz").write_bytes(b"")  # indexed, never decoded here
    meta = {"labels": {"background": 0, "anterior": 1, "posterior": 2}, "channel_names": {"0": "MRI"},
            "segment_codes": segment_codes}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_the_dataset_map_codes_its_labels_and_bad_entries_are_refused_by_name(tmp_path):
    spec = {"anterior": {"type": "Hippocampus", "colour": [10, 20, 30]},
            "posterior": {"type": ["SCT", "5366008", "Hippocampus"], "laterality": "Left"}}
    ds = load_dataset(_dataset(tmp_path / "ok", spec))
    codes = segment_codes(ds.labels, ds.segment_codes)
    assert codes[1].type[1] == codes[2].type[1] == "5366008" and codes[1].colour == (10, 20, 30)
    assert codes[2].laterality[2] == "Left" and codes[1].category[1] == "91723000"
    bad = {"middle": {"type": "Hippocampus"}}
    with pytest.raises(DatasetError, match=r"segment_codes\['middle'\]: no label of that name"):
        load_dataset(_dataset(tmp_path / "name", bad))
    with pytest.raises(DatasetError, match="'Hipocampus' is not a SNOMED CT keyword"):
        load_dataset(_dataset(tmp_path / "kw", {"anterior": {"type": "Hipocampus"}}))
    with pytest.raises(DatasetError, match="needs a 'type'"):
        load_dataset(_dataset(tmp_path / "type", {"anterior": {"colour": [1, 2, 3]}}))
    with pytest.raises(DatasetError, match="'laterality' must be one of"):
        load_dataset(_dataset(tmp_path / "side", {"anterior": {"type": "Hippocampus", "laterality": "L"}}))
    with pytest.raises(DatasetError, match="'colour' must be three integers"):
        load_dataset(_dataset(tmp_path / "rgb", {"anterior": {"type": "Hippocampus", "colour": [300, 0, 0]}}))


def test_dicom_seg_carries_the_codes_laterality_and_colours(tmp_path):
    import highdicom as hd

    from imaging.dicomseg import write_dicom_seg

    volume = read_image(CT5N)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[:, :4], labels[:, 4:8], labels[:, 8:12] = 1, 2, 3
    names = {0: "background", 1: "Brainstem", 2: "RightParotid", 3: "Anterior"}
    path = write_dicom_seg(labels, volume, names, tmp_path / "seg.dcm", software_version="t")
    seg = hd.seg.segread(path)
    described = {n: seg.get_segment_description(n) for n in (1, 2, 3)}
    assert described[1].segmented_property_type.value == "119238007"
    assert described[1].segmented_property_category.value == "91723000"
    item = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert item.CodeValue == "45289007" and item.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert described[3].segmented_property_type.value == "85756007"  # unknown name: generic tissue
    colours = [tuple(seg.SegmentSequence[i].RecommendedDisplayCIELabValue) for i in range(3)]
    assert len(set(colours)) == 3
    rgb = hd.color.CIELabColor.from_dicom_value(colours[0]).to_rgb()
    assert np.allclose(rgb, segment_code(1, "Brainstem").colour, atol=2)
    write_label_map(labels, volume.geometry, tmp_path / "mask.nii.gz")  # back onto the voxels (dciodvfy: below)
    check_exports(path, None, tmp_path / "mask.nii.gz", CT5N, names, dciodvfy=False)


def test_a_bundle_with_a_bad_code_map_is_refused_when_loaded(tmp_path):
    import shutil
    from pathlib import Path

    from imaging.errors import BundleError
    from isl.bundle import ISLBundle

    src = Path(__file__).resolve().parents[2] / "models" / "hippocampus_few"
    shutil.copytree(src, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert ISLBundle.load(tmp_path / "b").meta["dataset"]["segment_codes"]["anterior"] == {"type": "Hippocampus"}
    meta["dataset"]["segment_codes"] = {"anterior": {"type": "NoSuchStructure"}}
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="'NoSuchStructure' is not a SNOMED CT keyword"):
        ISLBundle.load(tmp_path / "b")


def test_isl_train_keeps_the_dataset_code_map_in_the_bundle(phantom_dataset, tmp_path):
    import shutil

    from isl.training.train import BundleTrainConfig, _meta

    root = tmp_path / "ds"
    shutil.copytree(phantom_dataset, root)
    meta = json.loads((root / "dataset.json").read_text())
    name = next(n for n in meta["labels"] if n != "background")
    meta["segment_codes"] = {name: {"type": "Hippocampus", "colour": [1, 2, 3]}}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(root)
    record = _meta(ds, BundleTrainConfig(), tmp_path / "b", [], [], [], [], [], {})
    assert record["dataset"]["segment_codes"] == meta["segment_codes"]
    assert "segment_codes" not in _meta(load_dataset(phantom_dataset), BundleTrainConfig(), tmp_path / "b", [], [],
                                        [], [], [], {})["dataset"]


@pytest.mark.dicom_peer("dciodvfy")
def test_dicom_seg_with_codes_passes_dciodvfy(tmp_path):
    from imaging.dicomseg import write_dicom_seg

    volume = read_image(CT5N)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[:, :4], labels[:, 4:8], labels[:, 8:12] = 1, 2, 3
    path = write_dicom_seg(labels, volume, {0: "background", 1: "Brainstem", 2: "LeftParotid", 3: "Anterior"},
                           tmp_path / "seg.dcm", software_version="t")

    def verdict(p):
        run = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
        return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]

    assert verdict(path) == []
    broken = pydicom.dcmread(path)  # the validator does check: a segment without its category is an error
    del broken.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence
    broken.save_as(tmp_path / "broken.dcm")
    assert verdict(tmp_path / "broken.dcm")
