"""fscr: checkpoint a process tree together with the filesystem it uses."""

import os

# pydantic looks for plugins of every installed distribution (importlib.metadata's entry
# points) when it builds its first model: ~15 ms of every command's start-up here. fscr uses
# none, and a plugin must not see manifests anyway.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
