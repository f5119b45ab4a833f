"""Running and recording experiments: entry points, result pages and the verdicts computed from them."""
