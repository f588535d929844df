"""Probes on frozen AIMv2 features: linear (logistic regression), kNN and attentive heads."""

from .attentive import AttentiveSettings
from .data import LabelledImages, ProbeDataError, load_labelled

__all__ = ["AttentiveSettings", "LabelledImages", "ProbeDataError", "load_labelled"]
