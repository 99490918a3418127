"""Kernels: one module per backend. Nothing heavy is imported here."""
