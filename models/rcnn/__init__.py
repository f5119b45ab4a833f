"""R-CNN building blocks (thesis ch. 3.1): proposals, region warping, SVMs with hard negatives, box regression.

Plain modules (no Lightning); ``lightning_modules/rcnn.py`` drives them.
"""
