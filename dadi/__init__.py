"""dadi: DADI-style lazy-loading container images."""

__version__ = "0.1.0"
