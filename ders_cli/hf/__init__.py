"""Glue to transformers' MoE model classes, shared by DeRS training and archive inference.

transformers is imported lazily by the functions that need it: the core of ders never needs it.
"""
