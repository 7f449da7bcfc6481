"""Test helper: write small mammography DICOM files with pydicom (used by the imaging and DICOM SEG tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


def make_dicom(arr: np.ndarray, path: Path, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
               transfer_syntax: str | None = None, **elements) -> Path:
    """Write ``arr`` as a Digital Mammography DICOM with pydicom (optionally compressed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = "test"
    bits = bits_stored or (8 if arr.dtype == np.uint8 else 16)
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in elements.items():
        setattr(ds, key, value)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path
