"""crbp-deploy: recurrent segmenters trained with C-RBP, from checkpoint to production."""
__version__ = "0.1.0"
