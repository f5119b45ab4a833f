"""R-CNN (thesis ch. 3): detection and region segmentation pipelines, their stages, cache keys, report and analysis."""
