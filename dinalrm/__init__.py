"""DiNa-LRM: shared code for training, evaluation and the command line (not Hub remote code)."""
