"""Deployment: model files, ONNX export, the Recognizer and its galleries."""
