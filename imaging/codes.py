"""What each segment IS, in codes a PACS and a planning system read: the SNOMED CT category, type and laterality
of every label, and its display colour, for DICOM SEG (Segment Description) and RTSTRUCT exports.

Codes come from pydicom's copy of the DICOM code dictionaries (`pydicom.sr.codedict`, which DICOM's context
groups CID 7150 / 7151 / 7166 draw on), looked up by keyword: no code value is typed by hand here. A label is
coded from, in this order:

1. the dataset's own map, `"segment_codes"` in `dataset.json` (carried into the bundle by `isl train`):
   `{"anterior": {"type": "Hippocampus"}, "tumour": {"category": "MorphologicallyAbnormalStructure",
   "type": ["SCT", "108369006", "Neoplasm"], "laterality": "Left", "colour": [255, 0, 0]}}`, where a code is a
   keyword of `pydicom.sr.codedict.codes.SCT` or a [scheme, value, meaning] triple;
2. its name, when it names a structure this module knows (`KNOWN`; "RightParotid", "left_kidney", "Spinal cord"
   and "brainstem" all resolve, laterality from a leading or trailing right/left);
3. otherwise the generic "Tissue" (category and type), as before this map existed: the segment label still
   carries the name, and `coded` says the code is generic.

Colours: the dataset's, else a fixed palette by label value (distinct hues, stable across exports of a model)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from imaging.errors import DatasetError

# normalised structure name -> (category keyword, type keyword) in pydicom's codes.SCT
_ANATOMY, _LESION = "AnatomicalStructure", "MorphologicallyAbnormalStructure"
KNOWN: dict[str, tuple[str, str]] = {
    **{n: (_ANATOMY, k) for n, k in {
        "brainstem": "BrainStem", "spinalcord": "SpinalCord", "cord": "SpinalCord", "parotid": "ParotidGland",
        "parotidgland": "ParotidGland", "esophagus": "Esophagus", "oesophagus": "Esophagus", "larynx": "Larynx",
        "mandible": "Mandible", "hippocampus": "Hippocampus", "brain": "Brain", "graymatter": "GrayMatter",
        "greymatter": "GrayMatter", "whitematter": "WhiteMatter", "liver": "Liver", "spleen": "Spleen",
        "kidney": "Kidney", "pancreas": "Pancreas", "gallbladder": "Gallbladder", "lung": "Lung", "heart": "Heart",
        "aorta": "Aorta", "stomach": "Stomach", "bladder": "Bladder", "urinarybladder": "Bladder",
    }.items()},
    **{n: (_LESION, k) for n, k in {
        "edema": "Edema", "oedema": "Edema", "necrosis": "Necrosis", "tumor": "Neoplasm", "tumour": "Neoplasm",
        "neoplasm": "Neoplasm", "lesion": "Lesion", "enhancingtumor": "Neoplasm", "enhancingtumour": "Neoplasm",
        "nonenhancingtumor": "Neoplasm", "nonenhancingtumour": "Neoplasm",
    }.items()},
}
SIDES = ("Right", "Left")
# distinct, readable on grey CT/MR (RGB); label value v takes PALETTE[(v - 1) % len]
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195))


@dataclass(frozen=True)
class SegmentCode:
    """One label's coded concept: (scheme, value, meaning) triples, the laterality modifier, an RGB colour."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    laterality: tuple[str, str, str] | None
    colour: tuple[int, int, int]
    coded: bool  # False: the generic "Tissue" fallback (the name matched nothing known and the dataset gave none)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _sct(keyword: str, where: str) -> tuple[str, str, str]:
    from pydicom.sr.codedict import codes

    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        raise DatasetError(f"{where}: {keyword!r} is not a SNOMED CT keyword of pydicom's code dictionary "
                           "(give a [scheme, value, meaning] triple instead)") from None
    return (code.scheme_designator, str(code.value), str(code.meaning))


def _code(spec, where: str) -> tuple[str, str, str]:
    if isinstance(spec, str):
        return _sct(spec, where)
    if isinstance(spec, (list, tuple)) and len(spec) == 3 and all(isinstance(s, str) and s for s in spec):
        return (spec[0], spec[1], spec[2])
    raise DatasetError(f"{where}: a code is a pydicom SCT keyword or a [scheme, value, meaning] triple, not {spec!r}")


def _by_name(name: str) -> tuple[str, str, str | None] | None:
    """(category keyword, type keyword, side) of a label name this module knows, else None."""
    key, side = _normalise(name), None
    for s in SIDES:
        for trimmed in (key.removeprefix(s.lower()), key.removesuffix(s.lower())):
            if trimmed != key and trimmed in KNOWN:
                key, side = trimmed, s
    if key not in KNOWN:
        return None
    return (*KNOWN[key], side)


def check_overrides(raw, labels: dict[int, str], where: str) -> dict[str, dict]:
    """Validate a dataset's `segment_codes` (label name -> spec) against its labels; returns it as given."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: 'segment_codes' must map label names to code specs")
    names = {n for v, n in labels.items() if v != 0}
    for name, spec in raw.items():
        at = f"{where}: segment_codes[{name!r}]"
        if name not in names:
            raise DatasetError(f"{at}: no label of that name (labels: {sorted(names)})")
        if not isinstance(spec, dict) or not set(spec) <= {"category", "type", "laterality", "colour"}:
            raise DatasetError(f"{at}: expected an object with 'type' and optional 'category', 'laterality', "
                               f"'colour'; got {spec!r}")
        if "type" not in spec and _by_name(name) is None:
            raise DatasetError(f"{at}: needs a 'type': the name {name!r} is not a structure known by name")
        segment_code(1, name, spec, at)  # every part resolves
    return dict(raw)


def segment_code(value: int, name: str, spec: dict | None = None, where: str = "segment_codes") -> SegmentCode:
    """The coded concept of label `value` named `name`, from the dataset's `spec` where given (see module doc)."""
    spec = spec or {}
    known = _by_name(name)
    colour = spec.get("colour", PALETTE[(value - 1) % len(PALETTE)])
    if not (isinstance(colour, (list, tuple)) and len(colour) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
        raise DatasetError(f"{where}: 'colour' must be three integers 0..255 (RGB), not {colour!r}")
    side = spec.get("laterality", known[2] if known else None)
    if side is not None and side not in SIDES:
        raise DatasetError(f"{where}: 'laterality' must be one of {SIDES}, not {side!r}")
    if "type" in spec:
        category = _code(spec.get("category", known[0] if known else _ANATOMY), where)
        return SegmentCode(category, _code(spec["type"], where), side and _sct(side, where), tuple(colour), True)
    if known:
        return SegmentCode(_sct(known[0], where), _sct(known[1], where), side and _sct(side, where), tuple(colour),
                           True)
    tissue = _sct("Tissue", where)
    return SegmentCode(tissue, tissue, None, tuple(colour), False)


def segment_codes(labels: dict[int, str], overrides: dict[str, dict] | None = None) -> dict[int, SegmentCode]:
    """Every foreground label's coded concept (label value -> SegmentCode)."""
    overrides = overrides or {}
    return {v: segment_code(v, n, overrides.get(n)) for v, n in labels.items() if v != 0}
