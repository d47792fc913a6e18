"""FedDyMem, the method: memory generator, metric loss, memory-reduce, the client's dynamic bank,
the global memory's aggregation (k-means over a secure sum) and the round, written once as a
sans-IO state machine (``round``) that the simulator (``simulate``) and the deployment drive.

May import: ``fedsecmem.detector``, ``fedsecmem.privacy``, ``fedsecmem.data`` and below,
``fedsecmem.protocols``, ``fedsecmem.crypto``, ``fedsecmem.audits``.
"""
