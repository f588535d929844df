"""Probes on frozen AIMv2 features: linear (logistic regression), kNN and attentive heads."""

from .attentive import AttentiveSettings
from .data import LabelledImages, ProbeDataError, load_labelled
from .head import ProbeHead
from .registry import HEAD_TYPES, HEADS
from .run import probe
from .saved import LoadedProbe, ProbeClassifier, load_probe
from .settings import ProbeSettings

__all__ = [
    "HEADS",
    "HEAD_TYPES",
    "AttentiveSettings",
    "LabelledImages",
    "LoadedProbe",
    "ProbeClassifier",
    "ProbeDataError",
    "ProbeHead",
    "ProbeSettings",
    "load_labelled",
    "load_probe",
    "probe",
]
