"""Deployment of a reconstructed model: integer kernels, the compiled path, packing and export.

``kernels`` (oneDNN and int8 GEMM custom ops), ``integer`` (``to_integer``: QuantLayers on
integer kernels, attention's products in int32), ``compiled`` (``torch.compile`` of the integer
model), ``packing`` (integer codes into bytes), ``export`` (one self-contained file).

Import from the modules; this file imports nothing, so a stage depends only on what it runs.
"""
