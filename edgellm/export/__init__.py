"""Exporters: one module per format (ONNX today; TVM and FPGA bundles later)."""
