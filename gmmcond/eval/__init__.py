"""Offline evaluation without downloaded weights: an evaluator trained on the run's data, defects, distances."""
