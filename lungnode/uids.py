"""DICOM UIDs: the grammar (PS3.5 §9.1), checked before any UID becomes part of a path or a row, and
the standard UIDs several modules name.

A UID is 1-64 characters of digit groups separated by single dots; a group is ``0`` or starts with a
non-zero digit. Nothing else (no spaces, no trailing NUL, no path separators) is accepted.
"""

from __future__ import annotations

import re

# Standard UIDs (PS3.6 Annex A) that more than one module names; tables of SOP classes and transfer
# syntaxes with their names (policy, conformance) list theirs in place.
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"

#: lungnode's Implementation Class UID (PS3.7 D.3.3.2; a UUID-derived UID under 2.25, fixed for
#: all versions): sent in the A-ASSOCIATE-AC and written in the file meta of received instances.
IMPLEMENTATION_CLASS_UID = "2.25.308344969267876139590962120053086323396"

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


class InvalidUIDError(ValueError):
    """A value that should be a UID is empty or breaks the grammar."""

    def __init__(self, attribute: str, value: object) -> None:
        self.attribute = attribute
        self.value = value
        shown = repr(value)[:80]
        super().__init__(f"{attribute} is {'empty' if not value else 'not a valid DICOM UID: ' + shown}")


def is_valid_uid(value: object) -> bool:
    """Return whether ``value`` is a string following the DICOM UID grammar."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def require_uid(attribute: str, value: object) -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InvalidUIDError`.

    Parameters
    ----------
    attribute:
        The attribute's keyword, used in the message (e.g. ``SeriesInstanceUID``).
    value:
        The value read from the dataset.
    """
    if not is_valid_uid(value):
        raise InvalidUIDError(attribute, value)
    return str(value)
