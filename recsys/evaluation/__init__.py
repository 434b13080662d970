"""Evaluation: the next-item harness, the scorer interface it calls, GRU4Rec as a scorer and
the baselines. Every ranking goes through ``recsys.ranking``.
"""
