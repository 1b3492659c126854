"""Training: the configuration and recipes, one training setup, the epoch loop, checkpointed state,
data-parallel processes, and the learning-rate range test.
"""
