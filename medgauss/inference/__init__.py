"""Inference commands on a user's NIfTI files: ``medgauss-segment`` (:mod:`medgauss.inference.segment`) and
``medgauss-register`` (:mod:`medgauss.inference.register`). Each reads a fine-tuning run (its ``model/`` export and
``config.yaml``), preprocesses like training, and writes NIfTI on the input image's own grid and affine."""
