"""Segmentations and scores of new scans from a study's models: semiseg-predict and semiseg-evaluate."""
