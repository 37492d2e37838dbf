"""Texts for evaluation and calibration, shipped with the package (see files/SOURCES.md) or read from a file."""

from lowbit.data.texts import (
    CALIBRATION_TEXTS,
    EVAL_TEXTS,
    calibration_text,
    calibration_windows,
    eval_text,
    read_text_file,
    tokenize_text,
)

__all__ = [
    "CALIBRATION_TEXTS",
    "EVAL_TEXTS",
    "calibration_text",
    "calibration_windows",
    "eval_text",
    "read_text_file",
    "tokenize_text",
]
