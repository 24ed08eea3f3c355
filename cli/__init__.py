"""The ``adamshap`` command line (imported as ``adamshap_cli``)."""
