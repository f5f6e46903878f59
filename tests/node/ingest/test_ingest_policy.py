"""Association policy: peers (AE + CIDR), called AE, association limit, DICOM TLS with DCMTK."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from lungnode.storage.models import AssociationRecord, AuditEvent
from tests.node.ingest.conftest import instance_rows, sop_uid, storescu, with_db
from tests.node_process import LungnodeProcess

CT = "1.2.840.10008.5.1.4.1.1.2"


def _associate(port: int, calling: str, called: str = "LUNGNODE") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc: object) -> tuple[int, int, int]:
    assert assoc.is_rejected  # type: ignore[attr-defined]
    rj = assoc.acceptor.primitive  # type: ignore[attr-defined]
    return (rj.result, rj.result_source, rj.diagnostic)


@pytest.fixture(scope="module")
def policy_node(tmp_path_factory: pytest.TempPathFactory) -> object:
    overrides = {"node": {"max_associations": 1,
                          "peers": [{"ae_title": "STORESCU", "host": "127.0.0.1"},
                                    {"ae_title": "TESTSCU", "host": "127.0.0.0/8"},
                                    {"ae_title": "FARAWAY", "host": "10.0.0.0/8"}]}}
    proc = LungnodeProcess(tmp_path_factory.mktemp("policy"), overrides)
    proc.start()
    yield proc
    assert proc.stop() == 0


def _rejected_rows(node: LungnodeProcess, calling: str) -> list[AssociationRecord]:
    return with_db(node, lambda s: list(s.execute(select(AssociationRecord).where(
        AssociationRecord.calling_ae == calling, AssociationRecord.outcome.like("rejected-%"))).scalars()))


def test_unknown_calling_ae_rejected(policy_node: LungnodeProcess, chest_ct_dir: Path,
                                     dcmtk_env: dict[str, str]) -> None:
    result = storescu(policy_node.port, [sorted(chest_ct_dir.glob("*.dcm"))[0]], dcmtk_env, aet="STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr or "Rejected" in result.stderr, result.stderr
    assert _rejection(_associate(policy_node.port, "STRANGER")) == (0x01, 0x01, 0x03)
    rows = _rejected_rows(policy_node, "STRANGER")
    assert len(rows) == 2 and all(r.outcome == "rejected-calling-ae" and r.ended_at for r in rows)
    audit = with_db(policy_node, lambda s: list(s.execute(select(AuditEvent).where(
        AuditEvent.event == "rejected", AuditEvent.ae_title == "STRANGER")).scalars()))
    assert len(audit) == 2 and audit[0].details["reason"] == "calling-ae"


def test_known_ae_from_wrong_network_rejected(policy_node: LungnodeProcess) -> None:
    assert _rejection(_associate(policy_node.port, "FARAWAY")) == (0x01, 0x01, 0x03)
    # The same AE rule with a CIDR that contains 127.0.0.1 is accepted.
    assoc = _associate(policy_node.port, "TESTSCU")
    assert assoc.is_established  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]


def test_wrong_called_ae_rejected(policy_node: LungnodeProcess) -> None:
    assert _rejection(_associate(policy_node.port, "STORESCU", called="NOTUS")) == (0x01, 0x01, 0x07)
    assert _rejected_rows(policy_node, "STORESCU")[-1].outcome == "rejected-called-ae"


def test_association_limit(policy_node: LungnodeProcess) -> None:
    first = _associate(policy_node.port, "TESTSCU")
    assert first.is_established  # type: ignore[attr-defined]
    try:
        assert _rejection(_associate(policy_node.port, "STORESCU")) == (0x02, 0x03, 0x02)
        assert _rejected_rows(policy_node, "STORESCU")[-1].outcome == "rejected-limit"
    finally:
        first.release()  # type: ignore[attr-defined]
    # Once the first association's end is recorded (just after its A-RELEASE-RP), a new one fits.
    for _ in range(50):
        second = _associate(policy_node.port, "STORESCU")
        if second.is_established:  # type: ignore[attr-defined]
            break
        time.sleep(0.1)
    assert second.is_established  # type: ignore[attr-defined]
    second.release()  # type: ignore[attr-defined]


def test_tls_round_trip_with_client_certificate(make_node: object, certs: dict[str, Path],
                                                chest_ct_dir: Path, dcmtk_env: dict[str, str]) -> None:
    node = make_node({"node": {"tls": {"cert": str(certs["server_pem"]), "key": str(certs["server_key"]),  # type: ignore[operator]
                                       "ca": str(certs["ca_pem"]), "require_client_cert": True}}})
    files = sorted(chest_ct_dir.glob("*.dcm"))[:3]
    tls = ["+tls", str(certs["client_key"]), str(certs["client_pem"]), "+cf", str(certs["ca_pem"])]
    result = storescu(node.port, files, dcmtk_env, extra=tls)
    assert result.returncode == 0, result.stderr
    assert len(instance_rows(node)) == 3
    assert {r.sop_instance_uid for r in instance_rows(node)} == {sop_uid(f) for f in files}
    # No client certificate (anonymous TLS) while one is required: the handshake fails, nothing stored.
    result = storescu(node.port, sorted(chest_ct_dir.glob("*.dcm"))[3:5], dcmtk_env,
                      extra=["+tla", "+cf", str(certs["ca_pem"])])
    assert result.returncode != 0
    assert len(instance_rows(node)) == 3
    # Plain TCP to the TLS port fails too.
    result = storescu(node.port, sorted(chest_ct_dir.glob("*.dcm"))[3:5], dcmtk_env)
    assert result.returncode != 0
    assert "TLS handshake from 127.0.0.1 failed" in node.log()
