"""Ray Data stages of `honed prepare`."""
