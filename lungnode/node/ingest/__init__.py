"""Receiving: the listener, the C-STORE handler, admission policy, header reading and cataloguing."""
