"""Image-quality and quantitative-accuracy metrics against a known truth (see ``sspect.eval.metrics``)."""
