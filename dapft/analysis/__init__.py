"""Layer 4, what a model's detections say: inference and COCO evaluation, the error breakdown,
galleries, an evaluation's report, `dapft eval` and `dapft predict`."""
