"""Corrections without training: the cheap candidates and baselines (AdaBN, histogram matching, FDA, their
composites, `build_baseline`) and the zoom that undoes another objective's scale. Above the domain check."""
