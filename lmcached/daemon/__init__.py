"""The daemon's processes: the scheduler, the workers, and what each one runs."""
