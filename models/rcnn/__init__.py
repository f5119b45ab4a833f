"""R-CNN building blocks (thesis ch. 3.1): proposals, region warping, region data sets and fine-tuning minibatches,
SVMs with hard negatives, box regression, NMS, segments.

Plain modules (no Lightning); ``engine/rcnn/pipeline.py`` and ``engine/rcnn/segmentation.py`` drive them.
"""
