"""fscr's conformance suite: CRIU's own ZDTM static tests, run by CRIU alone and by fscr.

A ZDTM test that CRIU alone passes here and fscr fails is a bug in fscr (or, for the few tests
that assert a file's st_dev or inode across restore, a limit of restoring a volume by
subvolume swap: conformance.zdtm.IDENTITY lists them). `python -m conformance --help` runs
it; docs/conformance.md describes the method and holds the last full run.
"""
