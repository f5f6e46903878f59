"""Operations: metrics, health, retention and the HTTP endpoints (the audit trail is in storage)."""
