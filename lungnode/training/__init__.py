"""Training: datasets, phantoms, the training loop, evaluation and export of model bundles."""
