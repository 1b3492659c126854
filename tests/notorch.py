"""The start of a Python script that cannot import torch or torchvision: for proving that a
code path (the onnx runtime, `cnnlab predict --backend onnx`) works without PyTorch."""

BLOCK_TORCH = '''
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
'''
