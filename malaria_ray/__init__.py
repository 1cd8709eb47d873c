"""malaria-ray: train and bulk-score a malaria blood-cell classifier with Ray."""

__version__ = "0.1.0"
