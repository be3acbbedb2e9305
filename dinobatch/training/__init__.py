"""Datasets and models: manifests, augmentation, training, evaluation, the sweep."""
