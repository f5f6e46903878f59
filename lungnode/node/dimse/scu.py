"""The DICOM SCU that sends results: C-STORE of stored files over one association, and C-ECHO checks.

:func:`send_items` sends files as they are stored (their transfer syntax proposed as is, no
re-encoding) and calls back after every acknowledged instance; :func:`check_destination` is what
``lungnode check-destination`` runs. Which deliveries are due, leases and retries live in
:mod:`lungnode.node.results.delivery`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, _config

from lungnode.config import DestinationConfig, TlsConfig
from lungnode.uids import (
    COMPREHENSIVE_SR_STORAGE,
    ENCAPSULATED_PDF_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    JPEG2000_LOSSLESS,
    SECONDARY_CAPTURE_STORAGE,
    SEGMENTATION_STORAGE,
    VERIFICATION,
)

log = logging.getLogger(__name__)

#: C-STORE statuses meaning "stored" (success, and warnings: coercion, elements discarded).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class LeaseLostError(RuntimeError):
    """Another sender took over this delivery (our lease expired)."""


@dataclass(frozen=True)
class OutboundItem:
    """One stored output file to send."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass
class SendResult:
    """What one association achieved."""

    acknowledged: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when every instance was stored and nothing went wrong."""
        return not self.failures and not self.error


def tls_args(tls: TlsConfig, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom ``tls_args`` for a destination, ``None`` when TLS is off."""
    if not (tls.cert or tls.ca):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    if tls.cert and tls.key:
        context.load_cert_chain(tls.cert, tls.key)
    return context, host


def _make_ae(dest: DestinationConfig, timeout: float) -> AE:
    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    ae.maximum_pdu_size = 0
    return ae


def send_items(dest: DestinationConfig, items: Sequence[OutboundItem], *, timeout: float = 60.0,
               on_ack: Callable[[str], None] | None = None) -> SendResult:
    """C-STORE ``items`` to ``dest`` over one association.

    Parameters
    ----------
    dest:
        The destination.
    items:
        Files to send (their transfer syntax is proposed as is).
    timeout:
        ACSE/DIMSE/network timeout in seconds.
    on_ack:
        Called with the SOP Instance UID after each stored instance, before the next is sent
        (may raise to stop, e.g. :class:`LeaseLostError`).

    Returns
    -------
    SendResult
    """
    result = SendResult()
    if not items:
        return result
    # Send each stored file's bytes as they are (no decode and re-encode by pydicom).
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = _make_ae(dest, timeout)
    for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items}):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         tls_args=tls_args(dest.tls, dest.host))
    if not assoc.is_established:
        result.error = (f"association with {dest.name} ({dest.host}:{dest.port}) "
                        f"{'rejected' if assoc.is_rejected else 'failed or aborted'}")
        return result
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    try:
        for item in items:
            if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                result.failures[item.sop_instance_uid] = (
                    f"peer refused SOP class {item.sop_class_uid} in {item.transfer_syntax_uid}")
                continue
            status = assoc.send_c_store(item.path)
            code = int(status.get("Status", -1)) if status else -1
            if code in STORED_STATUSES:
                if code != 0:
                    log.warning("%s stored %s with warning status 0x%04X", dest.name,
                                item.sop_instance_uid, code)
                result.acknowledged.append(item.sop_instance_uid)
                if on_ack is not None:
                    on_ack(item.sop_instance_uid)
            elif code == -1:
                result.error = f"no C-STORE response from {dest.name} (timeout or abort)"
                break
            else:
                result.failures[item.sop_instance_uid] = f"C-STORE status 0x{code:04X}"
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, LeaseLostError):
            raise
        result.error = f"sending to {dest.name} failed: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return result


@dataclass(frozen=True)
class DestinationCheck:
    """Outcome of ``lungnode check-destination``."""

    echo_status: int | None
    accepted: list[tuple[str, str]]
    rejected: list[tuple[str, str]]
    error: str = ""


#: What ``check-destination`` proposes: SEG (explicit, JPEG 2000 lossless), Comprehensive SR, SC,
#: Encapsulated PDF.
CHECK_CONTEXTS = (
    (SEGMENTATION_STORAGE, EXPLICIT_VR_LE),
    (SEGMENTATION_STORAGE, JPEG2000_LOSSLESS),
    (COMPREHENSIVE_SR_STORAGE, EXPLICIT_VR_LE),
    (SECONDARY_CAPTURE_STORAGE, EXPLICIT_VR_LE),
    (ENCAPSULATED_PDF_STORAGE, EXPLICIT_VR_LE),
)
SOP_NAMES = {SEGMENTATION_STORAGE: "Segmentation", VERIFICATION: "Verification",
             COMPREHENSIVE_SR_STORAGE: "Comprehensive SR", SECONDARY_CAPTURE_STORAGE: "Secondary Capture",
             ENCAPSULATED_PDF_STORAGE: "Encapsulated PDF"}
TS_NAMES = {EXPLICIT_VR_LE: "Explicit VR Little Endian", JPEG2000_LOSSLESS: "JPEG 2000 Lossless",
            IMPLICIT_VR_LE: "Implicit VR"}


def check_destination(dest: DestinationConfig, timeout: float = 30.0) -> DestinationCheck:
    """C-ECHO ``dest`` and report which result presentation contexts it accepts.

    Each (SOP class, transfer syntax) pair is proposed in its own presentation context so the
    peer answers every pair separately.
    """
    ae = _make_ae(dest, timeout)
    ae.add_requested_context(VERIFICATION)
    for sop_class, ts in CHECK_CONTEXTS:
        ae.add_requested_context(sop_class, [ts])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=tls_args(dest.tls, dest.host))
    except OSError as exc:
        return DestinationCheck(None, [], [], f"cannot connect: {exc}")
    if not assoc.is_established:
        return DestinationCheck(None, [], [], "association rejected or failed")
    try:
        status = assoc.send_c_echo()
        echo = int(status.Status) if status and "Status" in status else None
        accepted = [(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts
                    if c.abstract_syntax != VERIFICATION]
        rejected = [(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.rejected_contexts]
    finally:
        assoc.release()
    return DestinationCheck(echo, [(str(a), str(t)) for a, t in accepted],
                            [(str(a), str(t)) for a, t in rejected])
