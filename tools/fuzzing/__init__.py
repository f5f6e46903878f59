"""The fuzz campaign of ``tools/fuzz_node.py``: the raw DICOM peer (:mod:`fuzzing.wire`) and the
case families (:mod:`fuzzing.cases`)."""
