"""DeCAF (thesis ch. 2): frozen features + linear classifiers; its pipeline, domain-adaptation pipeline and report."""
