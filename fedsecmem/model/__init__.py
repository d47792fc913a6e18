"""A site's trained detector as a folder it keeps (``store``), the Python API that loads it and
scores images (``detector``), ``fedsecmem predict`` (``predict``) and ONNX export (``export``)."""
