"""The ``adamshap`` command line (imported as ``adamshap_cli``)."""

STOPPED = "stopped (Ctrl-C) before it finished."  # what Ctrl-C says outside train's own stop
TERMINATED = "stopped (SIGTERM) before it finished."  # and SIGTERM
