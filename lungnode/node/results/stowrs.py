"""DICOMweb STOW-RS: sending stored result files to ``[[destinations]] kind = "stow-rs"``.

Request
    One ``POST <url>/studies`` per delivery attempt with every file still unacknowledged, as
    ``multipart/related; type="application/dicom"`` (each part the stored Part 10 file, byte for
    byte), ``Accept: application/dicom+json``. Authentication: ``none``, ``basic``
    (``username`` + the password in ``secret_file``) or ``bearer`` (the token in ``secret_file``).
    HTTPS certificates are always verified, against ``ca`` when set, else the system's CAs.
    Redirects are not followed (:mod:`lungnode.ops.http`): a 3xx answer is a failed attempt whose
    error names the new address.
Answer (PS3.18 §10.5.3)
    ``200`` all stored, ``202`` some stored or stored with warnings, ``409`` none stored, other codes
    a failed attempt. The JSON body's Referenced SOP Sequence (0008,1199) lists the stored instances
    (each counts as acknowledged), Failed SOP Sequence (0008,1198) the refused ones with their
    Failure Reason (0008,1197). A ``200`` without a readable body acknowledges every instance (the
    standard says all were stored); any instance in neither sequence of a ``202``/``409`` is a
    failure.
Check
    :func:`check_stow` asks ``GET <url>/studies?limit=1`` (QIDO-RS) with the same authentication and
    TLS settings: reachable, authenticated, a DICOMweb service.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lungnode.ops.http import open_url, redirect_hint

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
#: Longest answer body read.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class StowTarget(Protocol):
    """What STOW-RS needs from a destination (:class:`lungnode.config.DestinationConfig`)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def auth(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def secret_file(self) -> str: ...
    @property
    def ca(self) -> str: ...


class StowItem(Protocol):
    """A stored file to send."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def path(self) -> Path: ...


@dataclass
class StowResult:
    """What one STOW-RS request achieved."""

    acknowledged: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    error: str = ""
    status: int | None = None


def _headers(target: StowTarget) -> dict[str, str]:
    headers = {"User-Agent": "lungnode"}
    if target.auth == "none":
        return headers
    secret = Path(target.secret_file).read_text(encoding="utf-8").strip()
    if target.auth == "basic":
        pair = f"{target.username}:{secret}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    elif target.auth == "bearer":
        headers["Authorization"] = f"Bearer {secret}"
    return headers


def multipart_body(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """``multipart/related`` body of DICOM files and its Content-Type (a boundary in no part)."""
    while True:
        boundary = f"lungnode-{uuid.uuid4().hex}"
        marker = boundary.encode()
        if not any(marker in p for p in parts):
            break
    chunks: list[bytes] = []
    for part in parts:
        chunks += [b"--", marker, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [b"--", marker, b"--\r\n"]
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), ctype


def _uids(answer: dict[str, Any], sequence: str) -> dict[str, str]:
    """``{SOP Instance UID: reason}`` of one sequence of a STOW-RS answer."""
    out: dict[str, str] = {}
    for item in (answer.get(sequence) or {}).get("Value") or []:
        uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [""])[0]
        reason = ((item.get(FAILURE_REASON) or item.get(WARNING_REASON) or {}).get("Value") or [""])[0]
        if uid:
            out[str(uid)] = f"0x{int(reason):04X}" if isinstance(reason, int) else str(reason)
    return out


def parse_answer(status: int, body: bytes, sent: Sequence[str]) -> StowResult:
    """Turn a STOW-RS answer into acknowledged and failed SOP Instance UIDs."""
    result = StowResult(status=status)
    try:
        answer = json.loads(body) if body.strip() else {}
        if isinstance(answer, list):  # some servers wrap the dataset in a list
            answer = answer[0] if answer else {}
        if not isinstance(answer, dict):
            raise ValueError("not a JSON dataset")
    except (ValueError, UnicodeDecodeError):
        answer = None
    if answer is None or not (REFERENCED_SOP_SEQUENCE in answer or FAILED_SOP_SEQUENCE in answer):
        if status == 200:
            result.acknowledged = list(sent)
        else:
            result.error = f"HTTP {status} without a readable STOW-RS answer"
        return result
    stored = _uids(answer, REFERENCED_SOP_SEQUENCE)
    failed = _uids(answer, FAILED_SOP_SEQUENCE)
    for uid in sent:
        if uid in stored and uid not in failed:
            result.acknowledged.append(uid)
        elif uid in failed:
            result.failures[uid] = f"STOW-RS failure reason {failed[uid] or 'unknown'}"
        else:
            result.failures[uid] = "not in the STOW-RS answer"
    return result


def stow_items(target: StowTarget, items: Sequence[StowItem], *, timeout: float = 60.0,
               on_ack: Callable[[str], None] | None = None) -> StowResult:
    """POST ``items`` to ``<url>/studies`` and record each acknowledged instance.

    Parameters
    ----------
    target:
        The destination.
    items:
        Stored files (sent byte for byte).
    timeout:
        Seconds for connecting and for each read.
    on_ack:
        Called with each acknowledged SOP Instance UID (may raise to stop).

    Returns
    -------
    StowResult
    """
    if not items:
        return StowResult()
    try:
        body, ctype = multipart_body([Path(i.path).read_bytes() for i in items])
        headers = {**_headers(target), "Content-Type": ctype, "Accept": "application/dicom+json"}
    except OSError as exc:
        return StowResult(error=f"cannot read a file or the secret: {exc}")
    request = urllib.request.Request(target.url.rstrip("/") + "/studies", data=body, method="POST",
                                     headers=headers)
    try:
        with open_url(request, timeout, target.ca) as resp:
            status, answer = int(resp.status), resp.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        status, answer = int(exc.code), exc.read(MAX_ANSWER_BYTES)
        if status not in (202, 409):
            return StowResult(error=f"STOW-RS to {target.name}: HTTP {status} {exc.reason}"
                                    f"{redirect_hint(exc)}", status=status)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return StowResult(error=f"STOW-RS to {target.name} failed: {reason}")
    result = parse_answer(status, answer, [i.sop_instance_uid for i in items])
    for uid in result.acknowledged:
        if on_ack is not None:
            on_ack(uid)
    return result


@dataclass(frozen=True)
class StowCheck:
    """Outcome of ``lungnode check-destination`` for a STOW-RS destination."""

    ok: bool
    detail: str
    status: int | None = None


def check_stow(target: StowTarget, timeout: float = 30.0) -> StowCheck:
    """Ask ``GET <url>/studies?limit=1`` (QIDO-RS) with the destination's auth and TLS settings."""
    try:
        headers = {**_headers(target), "Accept": "application/dicom+json"}
    except OSError as exc:
        return StowCheck(False, f"cannot read secret_file: {exc.strerror}")
    request = urllib.request.Request(target.url.rstrip("/") + "/studies?limit=1", headers=headers)
    try:
        with open_url(request, timeout, target.ca) as resp:
            status = int(resp.status)
            resp.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        if status in (401, 403):
            return StowCheck(False, f"HTTP {status}: authentication refused", status)
        hint = redirect_hint(exc) or f" (is {target.url} a DICOMweb root?)"
        return StowCheck(False, f"HTTP {status} {exc.reason}{hint}", status)
    except (OSError, ValueError) as exc:
        return StowCheck(False, f"cannot reach {target.url}: {getattr(exc, 'reason', exc)}")
    return StowCheck(True, f"QIDO-RS answered HTTP {status}: reachable and authenticated", status)
