"""The quantized model (docs/method.md §0): what a float denoiser becomes under PTQ.

One concept a module: ``quantizer`` (grid arithmetic, ``UniformAffineQuantizer``),
``adaround`` (learned rounding), ``layers`` (``QuantLayer``), ``attention``
(``QuantAttnProcessor``), ``units`` (the reconstruction units in execution order),
``timestep_groups`` (activation ranges per group of sampling steps), ``model``
(``quantize_model``, ``set_quant_state``), ``state`` (the state on disk, ``load_quant_model``),
``config`` (``QuantConfig``). Reconstruction is ``edadm.recon``; integer kernels and export
are ``edadm.deploy``.

Import from the modules; this file imports nothing, so a stage depends only on what it runs.
"""
