"""The stylization engine: ONNX Runtime for features and gradients, scipy's L-BFGS-B for the optimisation.

It knows nothing of gRPC; callers drive it through `Engine.stylize` and a `StylizeObserver`.
"""
