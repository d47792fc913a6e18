"""Secure-sum protocols (plain, SecAgg+, CKKS) as sans-IO state machines, and what is built on them.

Uses ``fedsecmem.crypto`` only; knows nothing of the pipeline.
"""
