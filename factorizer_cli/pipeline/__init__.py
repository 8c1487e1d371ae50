"""Pipeline: preprocess, infer (sliding window, TTA), postprocess."""
