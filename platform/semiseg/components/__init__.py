"""Pieces that methods compose (EMA teachers, pseudo-labels, uncertainty, discriminators)."""
