"""The zoo: real torchvision and timm trunks streamed in float64 (``python -m suites.zoo``)."""
