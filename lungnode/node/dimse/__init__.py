"""The DICOM wire: PDUs, the acceptor (the node's own DIMSE SCP) and the C-STORE/C-ECHO SCU."""
