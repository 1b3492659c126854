"""cnnlab: train, test and deploy convolutional image classifiers with PyTorch."""

__version__ = "0.1.0"

from .classifier import Classifier, Prediction  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .datasets import list_datasets, load_dataset  # noqa: E402
from .errors import CnnlabError  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .trainer import train  # noqa: E402

__all__ = ["Classifier", "Prediction", "TrainConfig", "CnnlabError", "create_model", "list_models",
           "register_model", "list_datasets", "load_dataset", "train", "__version__"]
