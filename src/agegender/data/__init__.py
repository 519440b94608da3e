"""Data sets: UTKFace's file names, labels files, near-duplicates, the split, the manifest and the
memory-mappable cache ``agegender prepare`` writes. No torch.
"""
