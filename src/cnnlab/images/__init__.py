"""Image files: which files are images, decoding, fitting to a model's input, test-time views.

`spec` holds the rules and needs neither PyTorch nor numpy; `decode` applies them to torch
tensors, `arrays` to numpy arrays for the torch-free ONNX runtime.
"""
