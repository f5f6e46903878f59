"""The fuzz campaign of ``tools/fuzz_node.py``: the raw DICOM peer (:mod:`tools.fuzzing.wire`) and the
case families (:mod:`tools.fuzzing.cases`)."""
