"""Evaluation: score a run's model on a dataset split, and the classification metrics.
"""
