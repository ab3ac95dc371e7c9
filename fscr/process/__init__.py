"""The task tree: discovery from /proc, freezing with the cgroup freezer, open-file scan."""
