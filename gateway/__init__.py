"""pdgate: a disaggregated prefill/decode serving gateway."""

__version__ = "0.1.0"
