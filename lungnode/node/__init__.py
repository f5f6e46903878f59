"""Node: everything between the network and the model, in four rooms.

:mod:`.dimse` (the DICOM wire: PDUs, acceptor, SCU), :mod:`.ingest` (a C-STORE from the socket to
a durable, catalogued file), :mod:`.dispatch` (complete series, rules, jobs, workers, pipeline) and
:mod:`.results` (SEG, SR, SC objects and their delivery). :mod:`.app` wires the services together.
"""
