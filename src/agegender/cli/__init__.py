"""The ``agegender`` command: one module per family of sub-commands over the layers below."""
