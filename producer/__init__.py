"""The `itsd` command line: the root group, and the commands that submit to and watch a fleet."""
