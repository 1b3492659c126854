"""Models: the registry by name, cnnlab's own architectures, and the trained `Classifier`.

Importing the package registers the built-in architectures.
"""

from . import nets as _nets  # noqa: F401  (registers fastnet, simple, lenet5, vgg11-small, resnet18-cifar)
