"""Everything that needs torch: models, losses, the training loop, checkpoints, ONNX export, the
torch backend, and loading any model for prediction (``loading.open_predictor``).
"""
