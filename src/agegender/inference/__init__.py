"""Prediction without torch: the options object, model files, ONNX Runtime, the ``Predictor``,
tracking through video, drawing.
"""
