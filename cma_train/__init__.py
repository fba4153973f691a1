"""cma_train: trainer and command line, kept apart from the cma_model library."""
