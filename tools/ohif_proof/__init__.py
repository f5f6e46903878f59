"""The viewer proof's steps (see ``tools/viewer_proof.py``, its command line and overview)."""
