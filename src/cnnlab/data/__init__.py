"""Data: built-in datasets and the user's image folders, the prepared on-disk cache, splits, and
the batches training draws (augmentation and normalisation as tensor ops).
"""
