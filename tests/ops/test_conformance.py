"""docs/conformance.md stays true: its tables equal the presentation contexts the code offers.

SCP side: the contexts the listener negotiates. SCU side: the contexts that
``check_destination`` really proposes to a peer (captured by a real SCP on loopback), and
``SCU_SOP_CLASSES`` when the SCU module defines it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from lungnode.config import Config, DestinationConfig
from lungnode.storage.db import Database
from lungnode.storage.filestore import FileStore
from tests.conftest import REPO, free_port

DOC = REPO / "docs" / "conformance.md"
VERIFICATION = "1.2.840.10008.1.1"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def doc_table(name: str, text: str | None = None) -> list[dict[str, str]]:
    """Rows of the markdown table after ``<!-- table:NAME -->`` as dicts keyed by header."""
    text = DOC.read_text() if text is None else text
    marker = f"<!-- table:{name} -->"
    assert marker in text, f"{marker} missing in {DOC}"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows: list[list[str]] = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, _sep, *body = rows
    return [dict(zip(header, r, strict=True)) for r in body]


def scp_contexts(config: Config, tmp_path: Path) -> dict[str, set[str]]:
    """Abstract syntax → transfer syntaxes the listener negotiates."""
    from lungnode.node.ingest.listener import ListenerWorker

    db = Database(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    try:
        listener = ListenerWorker(config, db, FileStore(tmp_path / "store", fsync=False))
        return {str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax}
                for cx in listener.supported_contexts}
    finally:
        db.dispose()


def scp_differences(contexts: dict[str, set[str]], text: str | None = None) -> list[str]:
    """What differs between the statement's SCP tables and ``contexts`` (empty: they agree)."""
    problems: list[str] = []
    sop_rows = doc_table("scp-sop-classes", text)
    ts_rows = doc_table("scp-transfer-syntaxes", text)
    doc_sops = {r["SOP Class UID"]: r["SOP Class Name"] for r in sop_rows}
    doc_ts = {r["Transfer Syntax UID"] for r in ts_rows}
    verification_rows = doc_table("scp-verification-transfer-syntaxes", text)
    verification_ts = {r["Transfer Syntax UID"] for r in verification_rows}
    for uid in sorted(set(contexts) - set(doc_sops)):
        problems.append(f"SOP class {uid} is accepted by the code but not in the statement")
    for uid in sorted(set(doc_sops) - set(contexts)):
        problems.append(f"SOP class {uid} ({doc_sops[uid]}) is in the statement but not accepted")
    for uid, syntaxes in sorted(contexts.items()):
        expected = verification_ts if uid == VERIFICATION else doc_ts
        if syntaxes != expected:
            problems.append(f"{uid}: transfer syntaxes differ: code-only {sorted(syntaxes - expected)}, "
                            f"statement-only {sorted(expected - syntaxes)}")
    for row in sop_rows + ts_rows + verification_rows:
        for key, value in row.items():
            if key.endswith("UID") and not _UID.match(value):
                problems.append(f"malformed UID {value!r} in the statement")
    return problems


def test_statement_scp_tables_equal_listener_contexts(ops_config: Config, tmp_path: Path) -> None:
    from lungnode.node.ingest.policy import SCP_SOP_CLASSES, SCP_TRANSFER_SYNTAXES

    contexts = scp_contexts(ops_config, tmp_path)
    assert scp_differences(contexts) == []
    # Names too: the statement uses the code's names.
    names = {r["SOP Class UID"]: r["SOP Class Name"] for r in doc_table("scp-sop-classes")}
    assert {u: names[u] for u in SCP_SOP_CLASSES} == SCP_SOP_CLASSES
    ts_names = {r["Transfer Syntax UID"]: r["Transfer Syntax Name"]
                for r in doc_table("scp-transfer-syntaxes")}
    assert ts_names == SCP_TRANSFER_SYNTAXES


def test_adding_a_sop_class_to_the_code_only_fails(ops_config: Config, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lungnode.node.ingest import listener, policy

    mr = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    extended = {**policy.SCP_SOP_CLASSES, mr: "MR Image Storage"}
    monkeypatch.setattr(policy, "SCP_SOP_CLASSES", extended)
    monkeypatch.setattr(listener, "SCP_SOP_CLASSES", extended)
    problems = scp_differences(scp_contexts(ops_config, tmp_path))
    assert problems == [f"SOP class {mr} is accepted by the code but not in the statement"]
    # And a class only in the statement is caught as well.
    raw = "| Raw Data Storage | 1.2.840.10008.5.1.4.1.1.66 | SCP | None |\n"
    extra = ("| MR Image Storage | 1.2.840.10008.5.1.4.1.1.4 | SCP | None |\n"
             "| Ultrasound Image Storage | 1.2.840.10008.5.1.4.1.1.6.1 | SCP | None |\n")
    text = DOC.read_text().replace(raw, raw + extra)
    assert scp_differences(scp_contexts(ops_config, tmp_path), text) == [
        "SOP class 1.2.840.10008.5.1.4.1.1.6.1 (Ultrasound Image Storage) is in the statement but "
        "not accepted"]


def _proposed_by_check_destination() -> set[tuple[str, str]]:
    """Run ``check_destination`` against a real SCP and return every (SOP class, TS) it proposed."""
    from lungnode.node.dimse.scu import check_destination

    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def on_requested(event: Any) -> None:
        with lock:
            for cx in event.assoc.requestor.requested_contexts:
                for ts in cx.transfer_syntax:
                    seen.add((str(cx.abstract_syntax), str(ts)))

    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_REQUESTED, on_requested)])
    try:
        check_destination(DestinationConfig(name="peer", ae_title="PEER", host="127.0.0.1", port=port),
                          timeout=10)
    finally:
        server.shutdown()
    return seen


def test_statement_scu_table_equals_what_the_code_proposes() -> None:
    rows = doc_table("scu-presentation-contexts")
    doc_pairs = {(r["SOP Class UID"], r["Transfer Syntax UID"]) for r in rows}
    proposed = _proposed_by_check_destination()
    assert proposed, "check_destination proposed nothing"
    assert proposed == doc_pairs
    from lungnode.node.dimse import scu
    from lungnode.node.results import seg

    # Every SEG transfer syntax a destination can choose is in the statement.
    assert {(r["SOP Class UID"], ts) for r in rows if r["SOP Class Name"] == "Segmentation Storage"
            for ts in seg.TRANSFER_SYNTAXES.values()} <= doc_pairs
    scu_classes = getattr(scu, "SCU_SOP_CLASSES", None)
    if scu_classes is not None:
        assert set(scu_classes) == {uid for uid, _ in doc_pairs}
