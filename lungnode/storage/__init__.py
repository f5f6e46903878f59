"""Durable state: SQLAlchemy tables (:mod:`.models`), the database (:mod:`.db`) and the file
store (:mod:`.filestore`)."""
