"""DIMSE, the sending half: a worker sends a job's DICOM results (SEG, RTSTRUCT) by C-STORE (pynetdicom) to the
destination that ISL_DIMSE_DESTINATIONS gives the job's tenant."""
from __future__ import annotations

from pathlib import Path

from service.settings import valid_ae_title


def parse_destination(text: str) -> tuple[str, str, int]:
    """'AET@host:port' -> (AE title, host, port); ValueError naming what is wrong."""
    aet, at, address = text.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or not valid_ae_title(aet):
        raise ValueError(f"DIMSE destination {text!r} is not AET@host:port")
    return aet, host, int(port)


def destinations(text: str) -> dict[str, tuple[str, str, int]]:
    """ISL_DIMSE_DESTINATIONS, 'tenant=AET@host:port,...' -> tenant -> (AE title, host, port)."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        tenant, eq, dest = item.partition("=")
        if not eq or not tenant.strip():
            raise ValueError(f"ISL_DIMSE_DESTINATIONS entry {item!r} is not tenant=AET@host:port")
        if tenant.strip() in out:
            raise ValueError(f"ISL_DIMSE_DESTINATIONS gives tenant {tenant.strip()!r} two destinations")
        out[tenant.strip()] = parse_destination(dest)
    return out


def send(files: list[Path], destination: tuple[str, str, int], calling_aet: str, timeout: float = 60) -> None:
    """C-STORE each file to (AE title, host, port) in one association; raises, naming the peer's answer, unless
    every file was stored."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(cls, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    aet, host, port = destination
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        why = "refused the association" if assoc.is_rejected else "could not be reached or aborted the association"
        raise RuntimeError(f"{aet}@{host}:{port} {why}")
    try:
        for f, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise RuntimeError(f"{aet}@{host}:{port} gave no answer to the C-STORE of {f.name}")
            if code_to_category(code) not in (STATUS_SUCCESS, STATUS_WARNING):  # a warning is stored too
                raise RuntimeError(f"{aet}@{host}:{port} refused {f.name}: C-STORE status 0x{code:04X}")
    finally:
        assoc.release()
