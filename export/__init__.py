"""Export: a diffusers InstructPix2Pix checkpoint -> verified ONNX artifacts with a manifest."""
