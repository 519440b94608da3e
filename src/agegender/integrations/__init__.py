"""Bridges to other engines, each behind its own extra (``pip install "agegender[ray]"``)."""
