"""Inference: series to masks and measurements. No network code; does not import node/ or storage/."""
