"""The model zoo: one JSON model card per pretrained model (installed as ``factorizer_cli.models``)."""
