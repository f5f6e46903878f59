"""Result objects lungnode writes and sends: DICOM SEG (:mod:`.seg`), TID 1500 SR (:mod:`.sr`),
burned-in Secondary Capture overlays (:mod:`.sc`), with provenance and series numbering in
:mod:`.common`. :mod:`.build` turns one :class:`~lungnode.inference.types.InferenceResult` into the
objects for one destination profile; :mod:`.delivery` sends them exactly once per destination.
"""
