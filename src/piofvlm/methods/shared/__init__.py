"""Helpers several methods share: attention recomputed from a decoder layer's weights (``attention``), captures of
more than the hidden states at a prune point (``capture``), and top-k / NMS / diversity selection (``selection``).
The mechanism (``piofvlm.core``) does not use them."""
