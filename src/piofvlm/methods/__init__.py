"""One file per method. Importing this package registers them all."""

from piofvlm.methods.base import Method, NoReduction, TokenPruner
from piofvlm.methods.pio import PIO
from piofvlm.methods.random import RandomPrune
from piofvlm.registry import register_method

register_method(NoReduction)

__all__ = ["PIO", "Method", "NoReduction", "RandomPrune", "TokenPruner"]
