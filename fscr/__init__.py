"""fscr: checkpoint a process tree together with the filesystem it uses."""
