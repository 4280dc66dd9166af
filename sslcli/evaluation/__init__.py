"""Evaluation of frozen encoders: weighted kNN and linear probing, with one results format.

The probe itself is ``sslcli.evaluation.linear_probe.linear_probe``; it is not re-exported
here because the name would shadow its module (``import sslcli.evaluation.linear_probe``
would then yield the function).
"""

from sslcli.evaluation.features import (
    EncoderInfo,
    LabelledFeatures,
    PixelEncoder,
    extract_features,
    extract_labelled,
    resolve_encoder,
)
from sslcli.evaluation.knn import knn_accuracy, knn_classify, knn_evaluate
from sslcli.evaluation.linear_probe import LinearHead, fit_linear_head, state_fingerprint
from sslcli.evaluation.results import (
    default_results_path,
    describe_data,
    print_results,
    topk_accuracy,
    write_results,
)

__all__ = [
    "EncoderInfo",
    "LabelledFeatures",
    "LinearHead",
    "PixelEncoder",
    "default_results_path",
    "describe_data",
    "extract_features",
    "extract_labelled",
    "fit_linear_head",
    "knn_accuracy",
    "knn_classify",
    "knn_evaluate",
    "print_results",
    "resolve_encoder",
    "state_fingerprint",
    "topk_accuracy",
    "write_results",
]
