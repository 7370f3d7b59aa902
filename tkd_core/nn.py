"""Drop-in nn.Modules over tkd ops: same constructors and state_dict keys as their torch twins."""
import torch
from torch import nn

from . import ops

# -- modules (one section each, kept in this order) --
# LayerNorm
# KDLoss
# MultiHeadAttention
# Int8Linear
