"""Probes on frozen AIMv2 features: linear (logistic regression), kNN and attentive heads."""

from .attentive import AttentiveSettings
from .data import LabelledImages, ProbeDataError, load_labelled
from .run import HEADS, ProbeClassifier, ProbeSettings, load_probe, probe

__all__ = ["HEADS", "AttentiveSettings", "LabelledImages", "ProbeClassifier", "ProbeDataError", "ProbeSettings",
           "load_labelled", "load_probe", "probe"]
