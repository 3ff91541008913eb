"""Sampling, FID/KID (torch-fidelity), no-reference quality scores (pyiqa), Pareto utilities."""
