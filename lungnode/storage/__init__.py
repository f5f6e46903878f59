"""Durable state: SQLAlchemy tables (:mod:`.models`), the database (:mod:`.db`), the file
store (:mod:`.filestore`), the append-only audit trail (:mod:`.audit`) and leased claims of rows
sent with retries (:mod:`.lease`)."""
