"""Training: instruction-prompted datasets (prepare), fine-tuning InstructPix2Pix (train), evaluation."""
