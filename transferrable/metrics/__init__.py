"""Metrics: numbers from predictions (VOC AP, segmentation IoU, caption metrics, 1-NN, per-class accuracy); no drawing, no training."""
