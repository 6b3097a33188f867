"""The `memr2` command line: thin dispatch onto the layers below it."""
