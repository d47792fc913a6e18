"""The detector: images to patch embeddings (frozen backbone), memory banks (coreset), scores,
anomaly maps and metrics. PatchCore's half of FedDyMem; it knows nothing of federation.

May import: ``fedsecmem.data``, ``fedsecmem.errors``, ``fedsecmem.progress``, ``fedsecmem.config``.
"""
