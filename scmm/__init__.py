"""scmm: a scMMGPT-style cell–text system for single-cell transcriptomics."""

__version__ = "0.1.0"
