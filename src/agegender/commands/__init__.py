"""The commands layer: one module per ``agegender`` sub-command that is more than a call.

These modules sit above the library (everything directly under :mod:`agegender`); nothing in
the library imports them. See ARCHITECTURE.md.
"""
