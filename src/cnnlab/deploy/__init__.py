"""Deployment: predict over files, serve over HTTP, export to ONNX/TorchScript, and the torch-free
ONNX runtime.
"""

ENGINES = ("auto", "torch", "onnxruntime")  # what `cnnlab serve` runs the model with (deploy.engine); torch-free for the CLI
