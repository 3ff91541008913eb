"""Evaluation: sampling for evaluation, FID/KID (torch-fidelity), quality scores (pyiqa), the front's axes."""
