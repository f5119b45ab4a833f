"""R-CNN building blocks (thesis ch. 3.1): proposals, region warping, region data sets and fine-tuning minibatches,
SVMs with hard negatives, box regression, NMS, segments.

Plain modules (no Lightning); ``engine/rcnn.py`` and ``engine/rcnn_segmentation.py`` drive them.
"""
