"""Measuring models: ``evaluate``, ``compare``, ``show``, the metrics and report tables, the data
exploration and the study's sweeps.
"""
