"""Quantized weight formats: one module per format behind `base.WeightFormat`."""
