"""Safety judges: labels and validation metrics, the registry of judges, the learned judge, the
BERT encoder and the audit set that measures judges on our own answers."""
