"""Operations: metrics, health, retention and the audit trail."""
