"""Layer 2, the models: the family adapters (everything that differs between DETR families),
loading a detector and its processor, tiny models of every family, ONNX export."""
