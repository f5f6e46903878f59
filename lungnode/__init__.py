"""lungnode: a DICOM node that segments lungs and COVID-19 infiltrates in chest CT and sends
DICOM SEG and TID 1500 SR results back to the PACS."""

__version__ = "0.1.0"
