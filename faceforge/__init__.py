"""faceforge: train and evaluate face-recognition models (ArcFace, SphereFace2, BroadFace, AttFC, BigFace)."""

__version__ = "0.1.0"
