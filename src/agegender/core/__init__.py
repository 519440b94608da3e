"""The bottom layer: errors, atomic file writes and the one rule for what an output may replace,
the training recipes. Imports nothing of agegender.
"""
