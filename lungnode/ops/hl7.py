"""HL7 v2.5.1 ORU^R01 result messages over MLLP, for ``[[notifications]] kind = "hl7"``.

The message is built from a notification's JSON body (:mod:`lungnode.ops.notify`):

``MSH``  sending application ``LUNGNODE`` and facility = our AE title, message type ``ORU^R01``,
         control id ``LN<notification id>`` (the same on every attempt), processing id ``P``.
``PID``  patient ID and name: only when the receiver has ``include_patient_data = true``
         (most RIS need them; otherwise they match on the accession number).
``OBR``  filler order number = accession number, universal service ``LUNGCT``, observation date =
         study date, result status ``F`` (done, delivered), ``P`` (held), ``X`` (failed).
``OBX``  percent of both lungs involved, infiltrate and lung volume (mL), the score when there is
         one, and a text impression (``TX``) with the per-side figures, the model and the page link.

MLLP framing: ``0x0B`` message ``0x1C 0x0D``; the receiver must answer an ``ACK`` whose ``MSA-1`` is
``AA`` or ``CA`` (anything else, or no answer, is a failed attempt that is retried).
Text is escaped with the HL7 escape sequences (``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``).
"""

from __future__ import annotations

import datetime as dt
import socket
from typing import Any
from urllib.parse import urlsplit

START, END = b"\x0b", b"\x1c\x0d"
#: MSA-1 codes that mean the receiver took the message.
ACCEPTED = ("AA", "CA")
RESULT_STATUS = {"done": "F", "delivered": "F", "held": "P", "failed": "X", "dead_letter": "F"}


def escape(value: Any) -> str:
    """Text as an HL7 field value (delimiters escaped, line breaks as spaces)."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\E\\")
    for char, code in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, code)
    return " ".join(text.split())


def _number(value: Any) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return ""


def impression(payload: dict[str, Any]) -> str:
    """A one-paragraph impression from the notification body."""
    job = payload.get("job") or {}
    m = payload.get("measurements") or {}
    event = payload.get("event", "")
    if event in ("held", "failed"):
        return f"Automatic lung CT analysis {event}: {job.get('reason') or 'no reason recorded'}."
    parts = []
    both = m.get("both") or {}
    if "percent_involved" in both:
        sides = ", ".join(f"{side} {_number((m.get(side) or {}).get('percent_involved'))} %"
                          for side in ("right", "left") if side in m)
        parts.append(f"Infiltrate involves {_number(both['percent_involved'])} % of the lungs"
                     + (f" ({sides})" if sides else "") + ".")
    if payload.get("score") is not None:
        parts.append(f"Score {payload['score']}.")
    model = payload.get("model") or {}
    if model:
        parts.append(f"Model {model.get('name', '')} {model.get('version', '')}, not for primary "
                     "diagnosis.")
    if job.get("url"):
        parts.append(f"Details: {job['url']}")
    return " ".join(parts) or "Automatic lung CT analysis finished."


def oru_r01(payload: dict[str, Any], control_id: str, now: dt.datetime | None = None) -> str:
    """The ORU^R01 message (segments joined by ``\\r``)."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%d%H%M%S")
    status = RESULT_STATUS.get(str(payload.get("event")), "F")
    patient = payload.get("patient") or {}
    m = payload.get("measurements") or {}
    both = m.get("both") or {}
    segments = [
        f"MSH|^~\\&|LUNGNODE|{escape(payload.get('node'))}|||{stamp}||ORU^R01^ORU_R01|"
        f"{escape(control_id)}|P|2.5.1",
        f"PID|1||{escape(patient.get('id'))}||{escape(patient.get('name'))}",
        f"OBR|1||{escape(payload.get('accession_number'))}|LUNGCT^Lung CT infiltrate quantification^L"
        f"|||{escape(payload.get('study_date'))}" + "|" * 15 + f"{stamp}||CT|{status}",
    ]
    observations: list[tuple[str, str, str, str]] = []
    if status == "F" and "percent_involved" in both:
        observations += [
            ("NM", "LN0001^Percent of lung involved^99LUNGNODE", _number(both["percent_involved"]), "%"),
            ("NM", "LN0002^Infiltrate volume^99LUNGNODE", _number(both.get("infiltrate_ml")), "mL"),
            ("NM", "LN0003^Lung volume^99LUNGNODE", _number(both.get("lung_ml")), "mL")]
        if isinstance(payload.get("score"), (int, float)):
            observations.append(("NM", "LN0004^Score^99LUNGNODE", str(payload["score"]), ""))
    observations.append(("TX", "IMP^Impression^L", escape(impression(payload)), ""))
    for i, (kind, code, value, unit) in enumerate(observations, start=1):
        segments.append(f"OBX|{i}|{kind}|{code}||{value}|{unit}|||||{status}")
    return "\r".join(segments) + "\r"


def send_mllp(url: str, message: str, timeout: float) -> str:
    """Send one message to ``mllp://host:port`` and return the ACK's ``MSA-1`` code.

    Raises
    ------
    OSError
        No connection or no complete answer within ``timeout``.
    """
    target = urlsplit(url)
    if target.scheme != "mllp" or not target.hostname or not target.port:
        raise ValueError(f"{url!r} is not mllp://HOST:PORT")
    with socket.create_connection((target.hostname, target.port), timeout=timeout) as sock:
        sock.sendall(START + message.encode("utf-8") + END)
        answer = b""
        while END not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the receiver closed the connection without an ACK")
            answer += chunk
            if len(answer) > 1_000_000:
                raise ConnectionError("answer too long")
    text = answer.split(START, 1)[-1].split(END, 1)[0].decode("utf-8", "replace")
    for segment in text.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSA" and len(fields) > 1:
            return fields[1]
    raise ConnectionError("the answer has no MSA segment")
