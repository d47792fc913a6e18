"""The references FedDyMem is measured against, in the same harness: each client alone (local),
pooled data (central), and parameter sharing of the generator (FedAvg, FedProx, Weight Scope
Alignment, FedSM).

May import: ``fedsecmem.method`` and everything it may import.
"""
