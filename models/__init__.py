"""Model build: VGG16 weights to an ONNX feature network, and the loss/gradient graphs generated from it."""
