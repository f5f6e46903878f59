"""Tools run from the repository root with ``python -m tools.NAME``: ``fuzz_node`` (a fuzz campaign
against a running node, :mod:`tools.fuzzing`) and ``viewer_proof`` (the OHIF viewer proof,
:mod:`tools.ohif_proof`)."""
