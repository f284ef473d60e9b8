"""Scaling laws: sweeps of ordinary training runs, power-law fits, plots."""
