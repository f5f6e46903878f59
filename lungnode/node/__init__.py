"""Node: DIMSE SCP/SCU, association policy, series completion, dispatch and DICOM result objects."""
