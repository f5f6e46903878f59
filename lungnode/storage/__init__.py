"""Durable state: SQLAlchemy tables (:mod:`.models`), the database (:mod:`.db`), the file
store (:mod:`.filestore`) and the append-only audit trail (:mod:`.audit`)."""
