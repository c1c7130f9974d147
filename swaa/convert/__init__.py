"""Pretrained model -> hybrid: conversion, registered hybrid classes, loading, evaluation.

Importing this package registers the hybrid classes with transformers' Auto classes (see
:mod:`swaa.convert.config`), so a saved hybrid loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from swaa.convert.config import register_hybrid_classes
from swaa.convert.families import FAMILIES, supported_families
from swaa.convert.hybrid import KINDS, convert_to_hybrid, hybrid_record, parse_linear_layers
from swaa.convert.transfer import attention_transfer

register_hybrid_classes()

__all__ = [
    "FAMILIES",
    "KINDS",
    "attention_transfer",
    "convert_to_hybrid",
    "hybrid_record",
    "parse_linear_layers",
    "register_hybrid_classes",
    "supported_families",
]
