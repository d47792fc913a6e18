"""FedDyMem across processes: ``serve`` and ``join`` drive the same round (``fedsecmem.method.round``)
over gRPC with mutual TLS, checkpoints and fault handling.

May import: ``fedsecmem.run`` and everything it may import; not the CLI.
"""
