"""The PyTorchTrial harness's torch-free parts: lengths and periods
(`units`), the trial and callback base classes (`trial`) and the training
loop (`loop`). `det.pytorch` builds on them with torch."""
