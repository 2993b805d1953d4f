"""Reconstruction of CT volumes from projections, behind one command (``medgauss-reconstruct``).

- :mod:`medgauss.recon.registry`: the method registry (:func:`register_method`, :func:`available_methods`,
  :func:`run_method`) and ``--opt`` option parsing;
- :mod:`medgauss.recon.methods`: the built-in methods ``fdk``, ``sart``, ``asd_pocs`` (registered on import);
- :mod:`medgauss.recon.learned`: the learned methods ``xgrm`` and ``ilrm`` (a trained XGRM checkpoint);
- :mod:`medgauss.recon.gaussian`: per-case Gaussian reconstruction (3DGR), the method ``3dgr``, its
  initialisers (FBP, R²-Gaussian, random, volume fit, pretrained MedGMAE decoder) and density control;
- :mod:`medgauss.recon.inputs`: reading a prepared case or a projection + geometry file pair;
- :mod:`medgauss.recon.cli`: the command and :func:`~medgauss.recon.cli.reconstruct`.

A new method registers in its own module with :func:`register_method`; importing that module here
makes it available to the command.
"""

from medgauss.recon import learned, methods  # noqa: F401  (register xgrm, ilrm; fdk, sart, asd_pocs)
from medgauss.recon.gaussian import method as _gaussian_method  # noqa: F401  (registers 3dgr)
from medgauss.recon.inputs import (
    ReconInputs,
    geometry_affine_from_json,
    geometry_to_json,
    load_case_inputs,
    load_file_inputs,
    read_geometry_file,
)
from medgauss.recon.registry import (
    MethodOutput,
    ReconMethod,
    available_methods,
    get_method,
    parse_options,
    register_method,
    run_method,
)

__all__ = [
    "MethodOutput",
    "ReconMethod",
    "register_method",
    "available_methods",
    "get_method",
    "run_method",
    "parse_options",
    "ReconInputs",
    "geometry_to_json",
    "geometry_affine_from_json",
    "read_geometry_file",
    "load_case_inputs",
    "load_file_inputs",
]
