"""The paper's applied claims on synthetic slides: resolution, saliency, LSUV (issue 15)."""
