"""Images and faces, without a model: decoding and its limits, the folder scanner, the YuNet
detector, alignment to UTKFace's geometry and the face crop a model sees.
"""
