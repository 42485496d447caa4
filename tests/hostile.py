"""A corpus of hostile uploads, made here from nothing: broken and lying NIfTI files, broken DICOM series,
and hostile zip archives. `corpus(folder)` writes them and returns (case name, [files of one upload])."""
from __future__ import annotations

import gzip
import io
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np


def nifti(shape=(12, 12, 12), dtype=np.float32, data=None, **header) -> bytes:
    """An uncompressed NIfTI-1 file; `header` overrides fields after the data is set (to make it lie)."""
    import nibabel as nib

    arr = np.asarray(data if data is not None else np.random.default_rng(0).normal(100, 20, shape), dtype=dtype)
    img = nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.0, 1.0]))
    for key, value in header.items():
        img.header[key] = value
    return img.to_bytes()


def with_dim(raw: bytes, dims: list[int]) -> bytes:
    """Rewrites the dim[8] field of a NIfTI-1 header in place (nibabel refuses to write such lies)."""
    return raw[:40] + struct.pack("<8h", *(dims + [1] * (8 - len(dims)))) + raw[56:]


def with_field(raw: bytes, offset: int, fmt: str, value) -> bytes:
    size = struct.calcsize(fmt)
    return raw[:offset] + struct.pack(fmt, value) + raw[offset + size:]


def dicom_series(n=5, rows=16, cols=16, series_uid=None, study_uid=None, transfer_syntax=None, pixel=True,
                 rows_claimed=None):
    """n CT slices of one series, as bytes (`rows_claimed`: the header claims more rows than the pixels hold)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    out = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax in (None, "rle") else transfer_syntax
        ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, study_uid
        ds.Modality, ds.PatientID, ds.PatientName, ds.InstanceNumber = "CT", "HOSTILE", "Hostile^Test", k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        if pixel and transfer_syntax == "rle":
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = (np.arange(rows * cols, dtype=np.int16) + k).tobytes()
            ds.compress("1.2.840.10008.1.2.5")  # RLE Lossless, a real compressed slice
        elif pixel and transfer_syntax:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 2])  # a codestream that breaks
            ds["PixelData"].VR = "OB"
        elif pixel:
            ds.PixelData = (np.arange(rows * cols, dtype=np.int16) + k).tobytes()
        if rows_claimed:
            ds.Rows = rows_claimed
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _zip(members: list[tuple], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate member names are one of the hostile cases
        for name, data, *mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if mode:
                info.external_attr = mode[0] << 16
            z.writestr(info, data)
    return buf.getvalue()


def cases() -> dict[str, list[tuple[str, bytes]]]:
    """name -> the files of one upload (file name, bytes)."""
    good = nifti()
    good_gz = gzip.compress(good)
    out: dict[str, list[tuple[str, bytes]]] = {}

    def one(name: str, data: bytes) -> list[tuple[str, bytes]]:
        return [(name, data)]

    # truncated and corrupt compressed NIfTI
    for cut in (10, 100, 348, len(good_gz) // 2, len(good_gz) - 8, len(good_gz) - 1):
        out[f"truncated_at_{cut}.nii.gz"] = one("scan.nii.gz", good_gz[:cut])
    crc = bytearray(good_gz)
    crc[-6] ^= 0xFF
    out["crc_broken.nii.gz"] = one("scan.nii.gz", bytes(crc))
    body = bytearray(good_gz)
    body[len(body) // 2] ^= 0x55
    out["deflate_stream_broken.nii.gz"] = one("scan.nii.gz", bytes(body))
    out["isize_lies.nii.gz"] = one("scan.nii.gz", good_gz[:-4] + struct.pack("<I", 1 << 31))
    out["truncated_plain.nii"] = one("scan.nii", good[: len(good) // 2])
    out["header_only.nii"] = one("scan.nii", good[:348])
    # headers that lie about the volume
    out["huge_dims.nii"] = one("scan.nii", with_dim(good, [3, 32767, 32767, 32767]))
    out["huge_dims.nii.gz"] = one("scan.nii.gz", gzip.compress(with_dim(good, [3, 30000, 30000, 3000])))
    out["negative_dim.nii"] = one("scan.nii", with_dim(good, [3, -12, 12, 12]))
    out["zero_dim.nii"] = one("scan.nii", with_dim(good, [3, 0, 12, 12]))
    out["zero_dim.nii.gz"] = one("scan.nii.gz", gzip.compress(with_dim(good, [3, 12, 12, 0])))
    out["ndim_9.nii"] = one("scan.nii", with_dim(good, [9, 12, 12, 12, 1, 1, 1, 1]))
    out["vox_offset_past_end.nii"] = one("scan.nii", with_field(good, 108, "<f", 1e9))
    out["bad_datatype.nii"] = one("scan.nii", with_field(good, 70, "<h", 9999))
    out["bitpix_lies.nii"] = one("scan.nii", with_field(good, 72, "<h", 64))
    out["nan_pixdim.nii"] = one("scan.nii", with_field(good, 80, "<f", float("nan")))
    out["zero_pixdim.nii"] = one("scan.nii", with_field(good, 80, "<f", 0.0))
    out["huge_pixdim.nii"] = one("scan.nii", with_field(good, 80, "<f", 1e30))
    # bad voxels and wrong dimensionality
    nan = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    nan[3, 3, 3] = np.nan
    out["nan_voxel.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(data=nan)))
    out["all_nan.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(data=np.full((12, 12, 12), np.nan, np.float32))))
    inf = np.ones((12, 12, 12), np.float32)
    inf[0, 0, 0] = np.inf
    out["inf_voxel.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(data=inf)))
    out["minus_inf_voxel.nii"] = one("scan.nii", nifti(data=-inf))
    out["2d.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(shape=(32, 32))))
    out["4d.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(shape=(12, 12, 12, 3))))
    out["5d.nii"] = one("scan.nii", nifti(shape=(6, 6, 6, 2, 2)))
    out["single_voxel.nii.gz"] = one("scan.nii.gz", gzip.compress(nifti(shape=(1, 1, 1))))
    # wrong magic bytes behind a valid extension
    out["png_as_nii.nii.gz"] = one("scan.nii.gz", b"\x89PNG\r\n\x1a\n" + b"\0" * 500)
    out["text_as_nii.nii"] = one("scan.nii", b"patient: nobody\n" * 40)
    out["elf_as_dcm.dcm"] = one("slice.dcm", b"\x7fELF" + b"\0" * 600)
    out["pdf_as_zip.zip"] = one("series.zip", b"%PDF-1.7\n" + b"\0" * 600)
    out["empty.nii.gz"] = one("scan.nii.gz", b"")
    out["gzip_of_text.nii.gz"] = one("scan.nii.gz", gzip.compress(b"not a nifti header at all " * 40))
    out["nifti2_magic_on_nifti1.nii"] = one("scan.nii", good[:344] + b"n+2\0" + good[348:])
    # DICOM
    series = dicom_series()
    out["dicom_missing_slice"] = [(f"{k}.dcm", d) for k, d in enumerate(series) if k != 2]
    out["dicom_mixed_series"] = [(f"{k}.dcm", d) for k, d in enumerate(series[:3] + dicom_series(3))]
    out["dicom_missing_pixel_data"] = [(f"{k}.dcm", d) for k, d in enumerate(dicom_series(pixel=False))]
    out["dicom_jpeg2000_garbage"] = [(f"{k}.dcm", d) for k, d in
                                     enumerate(dicom_series(transfer_syntax="1.2.840.10008.1.2.4.90"))]
    out["dicom_jpeg_baseline_garbage"] = [(f"{k}.dcm", d) for k, d in
                                          enumerate(dicom_series(transfer_syntax="1.2.840.10008.1.2.4.50"))]
    out["dicom_rle_lossless"] = [(f"{k}.dcm", d) for k, d in enumerate(dicom_series(transfer_syntax="rle"))]
    out["dicom_truncated_slice"] = [(f"{k}.dcm", d[: len(d) // 2] if k == 1 else d) for k, d in enumerate(series)]
    out["dicom_single_slice"] = [("0.dcm", series[0])]
    out["dicom_rows_lie"] = [(f"{k}.dcm", d) for k, d in enumerate(dicom_series(rows_claimed=60000))]
    out["dicom_and_nifti_mixed"] = [("0.dcm", series[0]), ("scan.nii.gz", good_gz)]
    # zip archives
    rest = [(f"s{k}.dcm", d) for k, d in enumerate(series[1:])]
    out["zip_slip.zip"] = one("series.zip", _zip([("../../escaped.dcm", series[0])] + rest))
    out["zip_absolute.zip"] = one("series.zip", _zip([("/tmp/isl-absolute-escape.dcm", series[0])]))
    out["zip_backslash_slip.zip"] = one("series.zip", _zip([("..\\..\\escaped2.dcm", series[0])]))
    out["zip_symlink.zip"] = one("series.zip", _zip([("link.dcm", "/etc/passwd", stat.S_IFLNK | 0o777)] +
                                                    [(f"s{k}.dcm", d) for k, d in enumerate(series)]))
    out["zip_bomb.zip"] = one("series.zip", _zip([("bomb.dcm", b"\0" * (200 << 20))]))
    inner = _zip([(f"s{k}.dcm", d) for k, d in enumerate(series)])
    out["zip_in_zip.zip"] = one("series.zip", _zip([("inner.zip", inner)]))
    many = [(f"m{k}.txt", b"") for k in range(20000)]
    out["zip_many_members.zip"] = one("series.zip", _zip(many, zipfile.ZIP_STORED))
    out["zip_empty.zip"] = one("series.zip", _zip([]))
    broken = bytearray(_zip([(f"s{k}.dcm", d) for k, d in enumerate(series)]))
    broken[60] ^= 0xFF  # inside the first member's data
    out["zip_crc_broken.zip"] = one("series.zip", bytes(broken))
    out["zip_truncated.zip"] = one("series.zip", _zip([(f"s{k}.dcm", d) for k, d in enumerate(series)])[:700])
    enc = bytearray(_zip([(f"s{k}.dcm", d) for k, d in enumerate(series)], zipfile.ZIP_STORED))
    enc[6] |= 0x01  # the encryption flag of the first local header
    out["zip_encrypted_flag.zip"] = one("series.zip", bytes(enc))
    out["zip_of_text.zip"] = one("series.zip", _zip([("readme.txt", b"hello" * 100)]))
    out["zip_duplicate_names.zip"] = one("series.zip", _zip([("s.dcm", d) for d in series]))
    out["zip_nifti_inside.zip"] = one("series.zip", _zip([("scan.nii.gz", good_gz)]))
    bomb = with_dim(good, [3, 12, 12, 12])[:352] + b"\0" * (300 << 20)
    out["deflate_bomb.nii.gz"] = one("scan.nii.gz", gzip.compress(bomb))
    out["raw_zlib.nii.gz"] = one("scan.nii.gz", zlib.compress(good))
    return out


def write(folder: Path) -> dict[str, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, files in cases().items():
        case = folder / name.replace("/", "_")
        case.mkdir()
        out[name] = []
        for fname, data in files:
            (case / fname).write_bytes(data)
            out[name].append(case / fname)
    return out
