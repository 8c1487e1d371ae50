"""Self-supervised pretraining in the manner of Models Genesis / Semantic Genesis: the corruptions a
network learns to undo (``transforms``)."""
