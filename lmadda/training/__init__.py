"""Training loops: pix2pix source training and LM-ADDA adaptation (plain PyTorch, no Ray)."""
