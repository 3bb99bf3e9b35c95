"""Training with BPTT / C-BPTT / RBP / C-RBP: `solve`, the LCP and the Neumann-series backward."""
from .lcp import LCP_REDUCTIONS, column_sums, lipschitz_penalty
from .rbp import NEUMANN_RULES, STOP_REASONS, NeumannInfo, neumann_vjp
from .solve import GRAD_MODES, Solution, solve

__all__ = [
    "GRAD_MODES",
    "LCP_REDUCTIONS",
    "NEUMANN_RULES",
    "STOP_REASONS",
    "NeumannInfo",
    "Solution",
    "column_sums",
    "lipschitz_penalty",
    "neumann_vjp",
    "solve",
]
