"""Deployment: predict over files, serve over HTTP, export to ONNX/TorchScript, and the torch-free
ONNX runtime.
"""
