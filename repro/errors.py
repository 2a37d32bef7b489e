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


class DiskFullError(ReproError):
    """A write that found no space left on its disk (what it left intact is for the caller to say)."""


class FolderBusyError(ReproError):
    """A run folder or store that another process holds."""
