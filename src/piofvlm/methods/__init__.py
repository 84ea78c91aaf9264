"""One file per method. Importing this package registers them all."""

from piofvlm.methods.base import Method, NoReduction, TokenPruner
from piofvlm.methods.cdpruner import CDPruner
from piofvlm.methods.chain import Chain
from piofvlm.methods.dart import DART
from piofvlm.methods.divprune import DivPrune
from piofvlm.methods.fastv import FastV
from piofvlm.methods.pdrop import PDrop
from piofvlm.methods.pio import PIO
from piofvlm.methods.pool import Pool
from piofvlm.methods.random import RandomPrune
from piofvlm.methods.sparsevlm import SparseVLM
from piofvlm.methods.visionzip import VisionZip
from piofvlm.methods.vscan import VScan
from piofvlm.registry import register_method

register_method(NoReduction)

__all__ = [
    "DART",
    "PIO",
    "CDPruner",
    "Chain",
    "DivPrune",
    "FastV",
    "Method",
    "NoReduction",
    "PDrop",
    "Pool",
    "RandomPrune",
    "SparseVLM",
    "TokenPruner",
    "VScan",
    "VisionZip",
]
