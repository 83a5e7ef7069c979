"""cifar-lightning: CIFAR-10 classifiers with PyTorch Lightning."""

from cifar_lightning.data import CLASSES, MEAN, STD, CIFAR10DataModule
from cifar_lightning.module import ImageClassifier
from cifar_lightning.predict import load_classifier

__all__ = ["CLASSES", "MEAN", "STD", "CIFAR10DataModule", "ImageClassifier", "load_classifier"]
