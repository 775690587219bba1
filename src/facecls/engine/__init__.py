"""The training core: the builder of a run, the loop with its callbacks, the train/evaluate steps."""
