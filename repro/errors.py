"""The project's own errors: problems the user can fix, explained in words. The entry points (`repro.cli`) print
them as one line, without a traceback, and exit with status 2."""


class ReproError(Exception):
    """A problem the user can fix, explained in words."""


class PrepareError(ReproError):
    """The raw ILSVRC-2012 input, or the folder a prepare writes into."""


class StoreError(ReproError):
    """A prepared store that is missing, unfinished or inconsistent."""


class RunError(ReproError):
    """A setting, the devices, a run folder or a checkpoint."""
