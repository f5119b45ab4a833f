"""LRCN (thesis ch. 4): activity recognition, image captioning, video description; their pipelines and reports."""
