"""Training-free carving of a dense SwiGLU model into a mixture of experts.

One pipeline (:mod:`.pipeline`: read the dense model, calibrate, carve every FFN, write,
record) drives a method through one small interface (:class:`~.pipeline.CarvingMethod`):

=========  ===================================  ============================================
method     shape (a ``CarvingMethod``)          one FFN becomes
=========  ===================================  ============================================
CMoE       :class:`.cmoe.CarveSpec` (SxAyEz)    S shared + N - S routed experts, a router
Grove      :class:`.grove.GroveCarveSpec`       a shared expert, G groups of n routed experts
                                                each with an adjugate expert, a router
=========  ===================================  ============================================

The steps both methods take are shared modules named for what they are: :mod:`.spec` (the
router choice and the expert slots), :mod:`.neurons` (activations, markers, rates, padding),
:mod:`.clustering` (balanced clustering), :mod:`.router_fit` (the training-free routers),
:mod:`.dense_model` (reading and the calibration forward), :mod:`.export` (run config and
Megatron checkpoint), :mod:`.weights` (a carved FFN's tensor names). The carved models route
with :mod:`megatron_grove.moe.cmoe_router`. A new method is one shape dataclass implementing
``CarvingMethod`` and a tool calling :func:`~.pipeline.carve_model_to` with it.

The package imports nothing itself (its modules pull in torch, transformers and Megatron), so
that a carving tool's ``--help`` stays instant.
"""
