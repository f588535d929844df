"""Probes on frozen AIMv2 features: linear (logistic regression), kNN and attentive heads."""

from .attentive import AttentiveSettings
from .data import LabelledImages, ProbeDataError, load_labelled
from .run import HEADS, ProbeSettings, classify_with_probe, load_probe, probe

__all__ = ["HEADS", "AttentiveSettings", "LabelledImages", "ProbeDataError", "ProbeSettings", "classify_with_probe",
           "load_labelled", "load_probe", "probe"]
